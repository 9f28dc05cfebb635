"""Builders of the tiny local foundation models (tiny LLaVA, tiny SAM) used by tests and CPU recipes."""
