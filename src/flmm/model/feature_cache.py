"""Frozen features computed once: per-sample LMM captures and SAM image embeddings on disk.

The LMM and SAM's image encoder never train, so what they produce for a sample never changes.
With ``data.cache_dir=DIR`` the first epoch stores, per sample, the phrase attention maps, the
phrase hidden states (what :class:`~flmm.types.CaptureOutput` holds) and, per image, SAM's image
embedding; later epochs read them back instead of running the frozen models.

Layout (one small file per entry, loaded memory-mapped)::

    DIR/lmm-<identity hash>/identity.json        what the hash stands for (model, settings)
    DIR/lmm-<identity hash>/ab/<sample key>.pt   maps, hidden, token_phrase, region
    DIR/sam-<identity hash>/ab/<image key>.pt    embedding, input_size

Every key hashes ``FORMAT_VERSION``, and an entry holding other fields than its format's is
recomputed (with a warning). An LMM entry's key hashes the LMM identity (model id, hub
revision, quantization, family, dtype, layer/merge/instruction settings, the sizes and dates of
its local weight files) with the image bytes, the text and the phrase spans; a SAM entry's key
hashes the image encoder's weights with the image bytes, so images shared by several samples are
embedded once. Floating tensors are stored as fp16 (float32 where a
value would overflow fp16). Entries are written to a temporary file and renamed into place, so
concurrent ranks writing the same entry, or a caching pass killed half-way, never leave a partial
entry: a rerun computes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from pathlib import Path

import torch

from flmm.errors import FlmmUserError
from flmm.files import write_atomic, write_text_atomic
from flmm.lmm.fingerprint import fingerprint
from flmm.types import CaptureOutput, GroundingBatch

log = logging.getLogger(__name__)

FP16_MAX = torch.finfo(torch.float16).max
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".json")
# part of every key: bump it when an entry's fields or their meaning change (old entries then
# miss). 2: regions are the image's (top, left, height, width) in a centred frame, the last
# hidden state is normed.
FORMAT_VERSION = 2
LMM_FIELDS = frozenset({"maps", "hidden", "token_phrase", "region"})
SAM_FIELDS = frozenset({"embedding", "input_size"})


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _image_bytes(image: torch.Tensor) -> bytes:
    return str(tuple(image.shape)).encode() + image.detach().contiguous().cpu().numpy().tobytes()


def local_files(path: str) -> list[list]:
    """``[name, size, mtime_ns]`` of the weight and config files of a local model folder."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    return [
        [f.name, f.stat().st_size, f.stat().st_mtime_ns]
        for f in sorted(folder.iterdir())
        if f.is_file() and f.suffix in WEIGHT_SUFFIXES
    ]


def lmm_identity(lmm) -> dict:
    """Everything about the frozen LMM that changes what it captures for a sample."""
    return {
        "format": FORMAT_VERSION,
        "model_id": lmm.model_id,
        "revision": lmm.revision,
        "quantization": lmm.quantization,
        "family": lmm.family.name,
        "dtype": str(next(lmm.parameters()).dtype),
        "text_layers": lmm.num_text_layers,
        "merge": lmm.merge,
        "instruction": lmm.instruction,
        "grid": list(lmm.grid),
        "channels": lmm.channels,
        "files": local_files(lmm.model_id),
    }


def to_storage(tensor: torch.Tensor) -> torch.Tensor:
    """fp16 on the CPU for floating tensors (float32 if fp16 would overflow); others as they are."""
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point():
        return tensor.contiguous()
    if tensor.numel() and tensor.abs().max() > FP16_MAX:
        return tensor.float().contiguous()
    return tensor.half().contiguous()


class EntryStore:
    """Files keyed by hex digests under one folder; atomic writes, memory-mapped reads."""

    def __init__(self, folder: Path, identity: dict, fields: frozenset[str]) -> None:
        self.folder, self.fields = folder, fields
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FlmmUserError(
                f"cannot create the feature cache folder {folder}: {err}; "
                "point `data.cache_dir=...` at a writable folder"
            ) from err
        write_text_atomic(folder / "identity.json", json.dumps(identity, indent=1))

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def load(self, key: str, shapes: dict[str, tuple]) -> dict[str, torch.Tensor] | None:
        """The entry stored under ``key``, or None (missing, unreadable or not of the ``shapes``
        :func:`shape_problem` checks: it is recomputed)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
            log.warning("feature cache entry %s is unreadable (%s); recomputing it", path, err)
            return None
        if not isinstance(entry, dict) or set(entry) != self.fields:
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            log.warning(
                "feature cache entry %s holds %s, not %s; recomputing it",
                path,
                found,
                sorted(self.fields),
            )
            return None
        problem = shape_problem(entry, shapes)
        if problem:
            log.warning("feature cache entry %s holds %s; recomputing it", path, problem)
            return None
        return entry

    def save(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        """Write ``entry`` under ``key`` atomically (temporary file in the same folder, renamed)."""
        write_atomic(self.path(key), lambda tmp: torch.save(entry, tmp))


class FeatureCache:
    """Cached frozen outputs for the samples of a :class:`~flmm.types.GroundingBatch`.

    Args:
        cache_dir: the cache folder (shared by runs, ranks and models: entries are keyed).
        lmm: the frozen :class:`~flmm.lmm.FrozenLMM` (called for samples not cached yet).
        refiner: the :class:`~flmm.heads.SamRefiner` whose frozen image encoder is cached.
    """

    def __init__(self, cache_dir: str | Path, lmm, refiner) -> None:
        self.lmm, self.refiner = lmm, refiner
        identity = lmm_identity(lmm)
        self.lmm_id = _digest(json.dumps(identity, sort_keys=True))
        sam_identity = {
            "format": FORMAT_VERSION,
            "image_encoder": fingerprint(refiner.sam.image_encoder),
        }
        self.sam_id = _digest(json.dumps(sam_identity, sort_keys=True))
        root = Path(cache_dir)
        self.lmm_store = EntryStore(root / f"lmm-{self.lmm_id[:16]}", identity, LMM_FIELDS)
        self.sam_store = EntryStore(root / f"sam-{self.sam_id[:16]}", sam_identity, SAM_FIELDS)
        self.hits = {"lmm": 0, "sam": 0}
        self.misses = {"lmm": 0, "sam": 0}

    def sample_key(self, batch: GroundingBatch, b: int) -> str:
        """Key of sample ``b``: LMM identity + image bytes + text + phrase spans."""
        spans = json.dumps([list(s) for s in batch.spans[b]])
        return _digest(self.lmm_id, _image_bytes(batch.images[b]), batch.texts[b], spans)

    def image_key(self, image: torch.Tensor) -> str:
        """Key of an image's SAM embedding: image-encoder weights + image bytes."""
        return _digest(self.sam_id, _image_bytes(image))

    def lookup(
        self, batch: GroundingBatch
    ) -> tuple[CaptureOutput, tuple[torch.Tensor, list[tuple[int, int]]]]:
        """The LMM capture and SAM embeddings of ``batch``, computing and storing missing ones."""
        return self.capture(batch), self.embed_images(batch.images)

    def capture(self, batch: GroundingBatch) -> CaptureOutput:
        """What ``lmm(batch)`` returns, from cached per-sample entries where they exist."""
        keys = [self.sample_key(batch, b) for b in range(len(batch))]
        entries = [
            self.lmm_store.load(k, self.capture_shapes(len(s))) for k, s in zip(keys, batch.spans)
        ]
        missing = [b for b, e in enumerate(entries) if e is None]
        self._count("lmm", len(batch), len(missing))
        if missing:
            fresh = split_capture(self.lmm(subset(batch, missing)))
            for b, entry in zip(missing, fresh):
                self.lmm_store.save(keys[b], entry)
                entries[b] = entry
        return join_capture(entries, batch.images[0].device)

    @torch.no_grad()
    def embed_images(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple]]:
        """What ``refiner.embed_images(images)`` returns, from cached per-image entries."""
        keys = [self.image_key(image) for image in images]
        prompts = self.refiner.sam.prompt_encoder
        shapes = {
            "embedding": (prompts.embed_dim, *prompts.image_embedding_size),
            "input_size": (2,),
        }
        entries = [self.sam_store.load(k, shapes) for k in keys]
        missing = [i for i, e in enumerate(entries) if e is None]
        self._count("sam", len(images), len(missing))
        if missing:
            embeddings, sizes = self.refiner.embed_images([images[i] for i in missing])
            for i, emb, size in zip(missing, embeddings, sizes):
                entry = {"embedding": to_storage(emb), "input_size": torch.tensor(size)}
                self.sam_store.save(keys[i], entry)
                entries[i] = entry
        dtype = next(self.refiner.sam.image_encoder.parameters()).dtype
        device = images[0].device
        # cast before stacking: CPU autocast (bf16) rejects stacking the stored fp16 tensors
        embeddings = torch.stack([e["embedding"].to(device, dtype) for e in entries])
        return embeddings, [tuple(int(v) for v in e["input_size"]) for e in entries]

    def capture_shapes(self, num_phrases: int) -> dict[str, tuple]:
        """The shapes of a sample's LMM entry (``R``: its phrase-token rows)."""
        lmm = self.lmm
        return {
            "maps": (num_phrases, lmm.channels, *lmm.grid),
            "hidden": (lmm.num_text_layers, "R", lmm.hidden_size),
            "token_phrase": ("R",),
            "region": (4,),
        }

    def _count(self, kind: str, total: int, missing: int) -> None:
        self.hits[kind] += total - missing
        self.misses[kind] += missing


def shape_problem(entry: dict[str, torch.Tensor], shapes: dict[str, tuple]) -> str | None:
    """What in ``entry`` differs from ``shapes`` (``{field: dims}``, a dim an int or a name that
    must be the same size wherever it appears), or None."""
    sizes: dict[str, int] = {}
    for name, dims in shapes.items():
        shape = tuple(entry[name].shape)
        fits = len(shape) == len(dims) and all(
            d == n if isinstance(d, int) else sizes.setdefault(d, n) == n
            for d, n in zip(dims, shape)
        )
        if not fits:
            return f"{name} of shape {shape}, not {dims}"
    return None


def subset(batch: GroundingBatch, index: list[int]) -> GroundingBatch:
    """The samples ``index`` of ``batch``, in that order."""
    return GroundingBatch(
        images=[batch.images[i] for i in index],
        texts=[batch.texts[i] for i in index],
        spans=[batch.spans[i] for i in index],
        masks=[batch.masks[i] for i in index],
        meta=[batch.meta[i] for i in index],
    )


def split_capture(capture: CaptureOutput) -> list[dict[str, torch.Tensor]]:
    """One storable entry per sample: its real phrases' maps and its real hidden-state rows."""
    entries = []
    for b in range(len(capture.maps)):
        rows = capture.token_phrase[b] >= 0
        entries.append(
            {
                "maps": to_storage(capture.maps[b][capture.phrase_mask[b]]),
                "hidden": to_storage(capture.hidden[b][:, rows]),
                "token_phrase": capture.token_phrase[b][rows].cpu(),
                "region": capture.region[b].detach().float().cpu(),
            }
        )
    return entries


def join_capture(entries: list[dict[str, torch.Tensor]], device: torch.device) -> CaptureOutput:
    """Pad per-sample entries back into one batch :class:`CaptureOutput` on ``device``."""
    k_max = max(len(e["maps"]) for e in entries)
    r_max = max(len(e["token_phrase"]) for e in entries)
    map_shape, hidden_shape = entries[0]["maps"].shape[1:], entries[0]["hidden"].shape
    maps = torch.zeros((len(entries), k_max, *map_shape), dtype=_widest(entries, "maps"))
    hidden = torch.zeros(
        (len(entries), hidden_shape[0], r_max, hidden_shape[2]), dtype=_widest(entries, "hidden")
    )
    token_phrase = torch.full((len(entries), r_max), -1, dtype=torch.long)
    phrase_mask = torch.zeros((len(entries), k_max), dtype=torch.bool)
    for b, e in enumerate(entries):
        k, r = len(e["maps"]), len(e["token_phrase"])
        maps[b, :k], hidden[b, :, :r] = e["maps"], e["hidden"]
        token_phrase[b, :r], phrase_mask[b, :k] = e["token_phrase"], True
    region = torch.stack([e["region"] for e in entries])
    return CaptureOutput(
        maps.to(device),
        phrase_mask.to(device),
        hidden.to(device),
        token_phrase.to(device),
        region.to(device),
    )


def _widest(entries: list[dict[str, torch.Tensor]], name: str) -> torch.dtype:
    """float32 if any entry stored ``name`` as float32 (fp16 would overflow), else fp16."""
    dtypes = {e[name].dtype for e in entries}
    return torch.float32 if torch.float32 in dtypes else torch.float16
