"""The synthetic world of coloured shapes: scenes, referring expressions, text corpus, writer."""

from flmm.data.synthetic.corpus import captions, pretraining_pairs, qa, vocabulary, words
from flmm.data.synthetic.expressions import Expression, referring_expressions, sample_expressions
from flmm.data.synthetic.world import Obj, Scene, sample_scene
from flmm.data.synthetic.write import (
    SyntheticDataModule,
    SyntheticPNGDataModule,
    attribute_oracle_masks,
    ensure_world,
    write_world,
)

__all__ = [
    "Expression",
    "Obj",
    "Scene",
    "SyntheticDataModule",
    "SyntheticPNGDataModule",
    "attribute_oracle_masks",
    "captions",
    "ensure_world",
    "pretraining_pairs",
    "qa",
    "referring_expressions",
    "sample_expressions",
    "sample_scene",
    "vocabulary",
    "words",
    "write_world",
]
