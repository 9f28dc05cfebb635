"""Frozen LMM adapters: a registry of HF families (as data) and one generic adapter."""

from flmm.lmm.adapter import FrozenLMM
from flmm.lmm.families import FAMILIES, Family, get_family, list_lmms

__all__ = ["FAMILIES", "Family", "FrozenLMM", "get_family", "list_lmms"]
