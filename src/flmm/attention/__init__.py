"""Capture of phrase-to-image attention through transformers' attention interface."""

from flmm.attention.capture import IMPLEMENTATION, Capture, capture, phrase_rows, use_capture

__all__ = ["IMPLEMENTATION", "Capture", "capture", "phrase_rows", "use_capture"]
