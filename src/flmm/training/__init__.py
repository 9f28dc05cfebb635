"""What training adds around the model: the trainer assembled from a run's config (trainer.py),
the run folder's checkpoint and reports (run_folder.py), callbacks (frozen-LMM check, overlays),
the frozen-feature cache, and the sharded-LMM strategy (``trainer=fsdp``)."""
