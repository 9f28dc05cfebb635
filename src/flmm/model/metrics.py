"""Grounding metrics as torchmetrics ``Metric``s; their states reduce across DDP processes.

``ReferSegMetric``: cIoU, gIoU and precision@IoU for referring expression segmentation.
``PNGRecallMetric``: PNG average recall (area under recall vs IoU threshold) per phrase group.
Masks come as an ``N x H x W`` tensor or a list of ``H x W`` masks (sizes may differ per object).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

Masks = torch.Tensor | Sequence[torch.Tensor | np.ndarray]
PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
PNG_GROUPS = ("all", "things", "stuff", "singular", "plural")


def intersections_unions(preds: Masks, targets: Masks) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object intersection and union pixel counts (two float64 tensors of ``N``)."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predicted masks but {len(targets)} target masks")
    pairs = [(torch.as_tensor(p).bool(), torch.as_tensor(t).bool()) for p, t in zip(preds, targets)]
    counts = [((p & t).sum(), (p | t).sum()) for p, t in pairs]
    if not counts:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    inter, union = (torch.stack(c).double() for c in zip(*counts))
    return inter, union


def ious_from_counts(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    """Per-object IoU; an empty prediction on an empty target scores 1.0."""
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def png_average_recall(ious: np.ndarray | torch.Tensor) -> float:
    """PNG average recall: the area under recall(t) = fraction of IoUs >= t, for t in [0, 1].

    Computed exactly: each IoU counts as recalled over thresholds ``[0, IoU]``, so the area is the
    mean IoU (PNG's evaluation approximates it on a fine threshold grid). In percent; NaN when
    there are no IoUs.
    """
    ious = np.asarray(torch.as_tensor(ious).cpu(), dtype=np.float64)
    if ious.size == 0:
        return float("nan")
    return 100.0 * float(np.clip(ious, 0.0, 1.0).mean())


class ReferSegMetric(Metric):
    """cIoU = 100 * sum(I) / sum(U); gIoU = 100 * mean per-object IoU; P@t = 100 * frac(IoU >= t).

    Per-object IoUs are kept (``per_object_ious``) so callers can bootstrap confidence intervals.
    """

    full_state_update = False

    def __init__(self, thresholds: Sequence[float] = PRECISION_THRESHOLDS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.thresholds = tuple(thresholds)
        self.add_state("intersection", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("union", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ious", [], dist_reduce_fx="cat")

    def update(self, preds: Masks, targets: Masks) -> None:
        """Add ``N`` boolean predicted masks and their ``N`` boolean targets."""
        inter, union = (x.to(self.device) for x in intersections_unions(preds, targets))
        self.intersection += inter.sum()
        self.union += union.sum()
        self.ious.append(ious_from_counts(inter, union))

    def per_object_ious(self) -> torch.Tensor:
        """All per-object IoUs seen so far (``N``, in [0, 1])."""
        return dim_zero_cat(self.ious) if len(self.ious) else torch.zeros(0, dtype=torch.float64)

    def compute(self) -> dict[str, torch.Tensor]:
        ious = self.per_object_ious()
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        result = {
            "cIoU": 100 * self.intersection / self.union if self.union > 0 else nan,
            "gIoU": 100 * ious.mean() if len(ious) else nan,
        }
        for t in self.thresholds:
            result[f"P@{t:g}"] = 100 * (ious >= t).double().mean() if len(ious) else nan
        return result


class PNGRecallMetric(Metric):
    """PNG average recall (percent) for each phrase group in ``groups``.

    ``update`` takes each object's group tags (e.g. ``{"things", "plural"}``); ``"all"`` is implied.
    """

    full_state_update = False

    def __init__(self, groups: Sequence[str] = PNG_GROUPS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.groups = tuple(groups)
        self.add_state("ious", [], dist_reduce_fx="cat")
        self.add_state("membership", [], dist_reduce_fx="cat")

    def update(self, preds: Masks, targets: Masks, tags: Sequence[Iterable[str]]) -> None:
        """Add ``N`` boolean predicted/target masks and ``N`` sets of group tags."""
        if len(tags) != len(preds):
            raise ValueError(f"{len(preds)} masks but {len(tags)} tag sets")
        inter, union = intersections_unions(preds, targets)
        member = [[g == "all" or g in set(t) for g in self.groups] for t in tags]
        self.ious.append(ious_from_counts(inter, union).to(self.device))
        member = torch.tensor(member, dtype=torch.float64, device=self.device)
        self.membership.append(member.reshape(-1, len(self.groups)))

    def compute(self) -> dict[str, torch.Tensor]:
        if not len(self.ious):
            return {f"AR/{g}": torch.tensor(float("nan")) for g in self.groups}
        ious, member = dim_zero_cat(self.ious), dim_zero_cat(self.membership).bool()
        return {
            f"AR/{g}": torch.tensor(png_average_recall(ious[member[:, i]]))
            for i, g in enumerate(self.groups)
        }
