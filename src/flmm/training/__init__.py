"""What training adds around the model: callbacks (frozen-LMM check, overlays), the frozen-feature
cache, and the sharded-LMM strategy (``trainer=fsdp``)."""
