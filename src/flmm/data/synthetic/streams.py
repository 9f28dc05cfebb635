"""The synthetic world's random streams: each use draws from ``np.random.default_rng([seed, stream])``
with a stream of its own, so no use sees another's scenes (the world's splits draw from streams
0, 1, 2: flmm.data.synthetic.write). The numbers are part of the world: changing one changes the
scenes it draws, the shipped foundation models' recipes and every run."""

from __future__ import annotations

from enum import IntEnum, unique


@unique
class Stream(IntEnum):
    """One stream per use of the world's scenes, beyond its three splits."""

    POPE = 101  # POPE's questions (flmm.data.synthetic.pope)
    PRETRAIN = 102  # the tiny LLaVA's language (pretraining) stage
    AGREEMENT = 103  # the scenes the half-precision export is checked on (flmm.foundation.build)
    INSTRUCT = 104  # the tiny LLaVA's instruction stage
    PROBE = 105  # the vision tower's probe (scripts/vision_probe.py)
    VISION = 106  # the tiny LLaVA's vision-tower stage
    VQA = 107  # the tiny LLaVA's short-answer (VQA) stage
    QUESTIONS = 108  # the short-answer report's questions (scripts/tiny_llava_report.py)
    NEGATIVES = 109  # the tiny LLaVA's near-miss negatives stage
