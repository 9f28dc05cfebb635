"""Whole F-LMM training steps, the reference code's way vs this project's, side by side.

Four cases on the same frozen LMM and SAM (random weights: speed does not depend on their values)
and the same samples (several phrases each), timed interleaved round-robin so that load from other
processes hits them alike:

  (a) reference  batch 1; the LMM in eager attention, called with ``output_attentions=True`` and
                 ``output_hidden_states=True`` (every layer's N x N maps kept), phrase rows x image
                 columns sliced afterwards; SAM's prompt encoder + mask decoder called once per
                 phrase (the reference's SAMWrapper loop). Heads identical to (b);
  (b) flmm       batch B; ``flmm_capture`` (sdpa + phrase rows only); batched SAM decoding;
  (c) cached     (b) with the frozen-feature cache warm (epochs 2..n): heads only;
  (d) floor      the frozen LMM's plain sdpa forward + SAM's image encoder, batch B, no heads.

A training step of (a)-(c) is forward, the four losses, backward, gradient-norm clipping and an
AdamW step (lr 0: all of the optimizer's work, weights left as they were). Samples/s is the median
over ``--repeats`` passes over the same ``--samples`` samples, timed by the wall clock on CUDA and
by the process's CPU time on the CPU (1 thread per case: on a shared machine wall-clock time
mostly measures the other jobs). Peak memory: on CUDA ``max_memory_allocated`` (one process); on
the CPU every case runs in its own subprocess (the main process tells one at a time to run a
pass) and reports its peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` before each
pass, after ``malloc_trim``). "step" memory is that peak minus what the process held just before
the pass (weights, optimizer state, the inputs; on the CPU also what the allocator kept); per
sample it is divided by the samples of one step (1 for (a), B otherwise).

Presets (``--preset``):
  cpu          LLaVA-1.5-7B's decoder layer shape (width 4096, 32 heads, MLP 11008), 1 layer of 32,
               its 336 px / 14 px image grid (576 image tokens) behind a small CLIP tower (256 wide,
               2 layers); a small SAM with the released mask decoder's width (256) on a 256 px
               ViT encoder (384 wide, 2 layers, 16 x 16 embedding grid); fp32, 1 thread, B = 4;
  gpu-llava15  the full LLaVA-1.5-7B shape (32 layers, CLIP ViT-L/14-336, 576 image tokens), bf16,
               SAM ViT-L at 1024, B = 8, bf16 autocast as ``trainer=gpu``;
  gpu-next     LLaVA-NeXT-7B's shape (any-res 2 x 2 tiles + base: 2,928 image tokens on a 672 px
               square image), otherwise as gpu-llava15;
  tiny         a seconds-long smoke run (the tests use it); tiny-next: the GPU presets' code path
               (any-res LLaVA-NeXT grids, bf16 weights and autocast) at that size, on the CPU.

    make bench-train        # = --preset cpu --json docs/benchmarks/train_throughput_cpu.json
    python benchmarks/train_throughput.py --preset gpu-llava15 --preset gpu-next   # on a GPU
    python benchmarks/train_throughput.py --preset cpu --profile   # (b) by phase, top ops
    python benchmarks/train_throughput.py --preset gpu-llava15 --cases reference cached --compile
                            # (b) and (c)'s heads torch.compiled; (a) stays eager
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from flmm.attention.capture import IMPLEMENTATION, phrase_rows
from flmm.foundation.real_shape import default_dtype
from flmm.foundation.tiny_llava import CHAT_TEMPLATE, DEFAULT_WORDS, build_tokenizer, default_words
from flmm.heads import SamRefiner, build_sam
from flmm.heads.sam_refiner import coarse_boxes, mask_prompt
from flmm.lmm import FrozenLMM
from flmm.lmm.families import get_family
from flmm.model.feature_cache import FeatureCache
from flmm.model.network import FLMMModel
from flmm.types import CaptureOutput, GroundingBatch, GroundingSample

CASES = ("reference", "flmm", "cached", "floor")
LABELS = {"reference": "(a)", "flmm": "(b)", "cached": "(c)", "floor": "(d)"}
TARGETS = {  # ratio -> (target, True if "at least", where the issue sets it)
    "b/a samples/s": (3.0, True, "GPU, LLaVA-1.5-7B shape"),
    "b/a memory/sample": (0.5, False, "GPU, LLaVA-NeXT shape"),
    "c/a samples/s": (20.0, True, "any"),
    "b/d time/sample": (1.15, False, "any"),
}
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


SMALL_SAM = {  # released decoder width / heads / MLP; a 256 px, 384-wide, 2-layer ViT encoder
    "img_size": 256,
    "patch_size": 16,
    "embed_dim": 384,
    "depth": 2,
    "num_heads": 6,
    "prompt_dim": 256,
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
    "decoder_heads": 8,
    "mask_in_chans": 16,
}


@dataclass(frozen=True)
class Preset:
    """Shapes, precision and sizes of one benchmark configuration; the defaults are the CPU proxy.

    ``sam`` is ``(variant, tiny sizes)`` for :func:`flmm.heads.build_sam`; ``image_hw`` the
    samples' image size; ``vocab`` the embedding rows (None: the word-level tokenizer's ~110).
    """

    family: str = "llava"
    layers: int = 1
    width: int = 4096
    heads: int = 32
    mlp: int = 11008
    vision: tuple[int, int, int] = (256, 2, 4)  # CLIP tower width, layers, heads
    tile: int = 336
    patch: int = 14
    vocab: int | None = None
    sam: tuple[str, dict] = ("tiny", SMALL_SAM)
    base_channels: int = 64
    image_hw: tuple[int, int] = (240, 320)
    phrases: int = 4
    batch: int = 4
    samples: int = 4
    repeats: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    compile: str | None = None  # torch.compile backend of (b) and (c)'s heads; None: eager


GPU = {  # LLaVA-1.5-7B: 32 layers, CLIP ViT-L/14-336, 32,064 tokens; SAM ViT-L
    "layers": 32,
    "vision": (1024, 24, 16),
    "vocab": 32064,
    "sam": ("vit_l", {}),
    "image_hw": (480, 640),
    "batch": 8,
    "samples": 16,
    "repeats": 3,
    "device": "cuda",
    "dtype": "bfloat16",
}
PRESETS = {
    "cpu": Preset(),
    "gpu-llava15": Preset(**GPU),
    "gpu-next": Preset(**{**GPU, "family": "llava_next", "image_hw": (672, 672)}),
    "tiny": Preset(
        layers=2,
        width=64,
        heads=4,
        mlp=128,
        vision=(32, 1, 2),
        tile=48,
        patch=8,
        sam=("tiny", {}),
        base_channels=8,
        image_hw=(40, 56),
        phrases=2,
        batch=2,
        samples=2,
        repeats=1,
    ),
}
# the GPU presets' code path (any-res grids, bf16 weights and autocast) at tiny size, on the CPU
PRESETS["tiny-next"] = dataclasses.replace(
    PRESETS["tiny"], family="llava_next", image_hw=(96, 96), dtype="bfloat16"
)


# ------------------------------------------------------------------------------ models and data
def build_lmm(p: Preset) -> FrozenLMM:
    """A random frozen LLaVA (``p.family``: llava, llava_next) of ``p``'s shape on ``p.device``."""
    tokenizer = build_tokenizer(default_words())
    text = transformers.LlamaConfig(
        vocab_size=p.vocab or len(tokenizer),
        hidden_size=p.width,
        intermediate_size=p.mlp,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    width, depth, heads = p.vision
    vision = transformers.CLIPVisionConfig(
        image_size=p.tile,
        patch_size=p.patch,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        projection_dim=width,
    )
    common = {
        "vision_config": vision,
        "text_config": text,
        "image_token_id": tokenizer.convert_tokens_to_ids("<image>"),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }
    image_kwargs = {"crop_size": {"height": p.tile, "width": p.tile}}
    image_kwargs["size"] = {"shortest_edge": p.tile}
    if p.family == "llava":
        config = transformers.LlavaConfig(**common)
        image_processor = transformers.CLIPImageProcessor(**image_kwargs)
        processor_class, model_class = transformers.LlavaProcessor, "LlavaForConditionalGeneration"
    else:
        pinpoints = [[p.tile * h // 336, p.tile * w // 336] for h, w in NEXT_PINPOINTS]
        config = transformers.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
        image_processor = transformers.LlavaNextImageProcessor(
            **image_kwargs, image_grid_pinpoints=pinpoints
        )
        processor_class = transformers.LlavaNextProcessor
        model_class = "LlavaNextForConditionalGeneration"
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    torch.manual_seed(0)
    with torch.device(p.device), default_dtype(getattr(torch, p.dtype)):
        model = getattr(transformers, model_class)(config).eval()
    name = f"random-{p.family}-{p.layers}x{p.width}"
    return FrozenLMM(model, processor, get_family(p.family), name)


def make_samples(p: Preset, seed: int = 0) -> list[GroundingSample]:
    """``p.samples`` random images with ``p.phrases`` phrases each, one box mask per phrase."""
    rng = np.random.default_rng(seed)
    words = [w for w in DEFAULT_WORDS if w.isalpha()]
    height, width = p.image_hw
    samples = []
    for _ in range(p.samples):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        phrases = [" ".join(rng.choice(words, size=3)) for _ in range(p.phrases)]
        text, spans = "", []
        for phrase in phrases:
            spans.append((len(text), len(text) + len(phrase)))
            text += phrase + ". "
        masks = np.zeros((p.phrases, height, width), dtype=bool)
        for mask in masks:
            y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
            mask[y : y + height // 3, x : x + width // 3] = True
        samples.append(GroundingSample(image, text.strip(), spans, masks))
    return samples


class PerPhraseRefiner(SamRefiner):
    """The reference's SAM wrapper: per phrase, its own prompt-encoder + mask-decoder call on its
    image's ``1 x C x he x we`` embedding and its own upscaling to the image (same prompts and
    outputs as :class:`SamRefiner`, which decodes all phrases of a batch in one call)."""

    def forward(self, embeddings, coarse_logits, text_embeds, input_sizes, original_sizes):
        """Arguments and result as :meth:`SamRefiner.forward`."""
        refined = []
        for b, (logits, texts) in enumerate(zip(coarse_logits, text_embeds)):
            per_phrase = [
                self.decode_one(embeddings[b : b + 1], logits[k : k + 1], text, input_sizes[b])
                for k, text in enumerate(texts)
            ]
            sizes = input_sizes[b], original_sizes[b]
            refined.append(torch.cat([self.sam.postprocess_masks(m, *sizes) for m in per_phrase]))
        return [r[:, 0] for r in refined]

    def decode_one(self, embedding, logits, text, input_size):
        """``1 x 1 x M x M`` low-res logits of one phrase (``logits``: ``1 x h x w``)."""
        mask = mask_prompt(self.sam, logits, input_size)
        box = coarse_boxes(logits, input_size)
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=box, masks=mask)
        sparse = torch.cat([sparse, text[None].to(sparse.dtype)], dim=1)
        low_res, _ = self.sam.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low_res


@dataclass
class Rig:
    """Everything the four cases share: one F-LMM (and a reference-style twin over the same
    modules), the batches, the optimizer and, once filled, the feature cache."""

    preset: Preset
    model: FLMMModel
    reference: FLMMModel
    batches: list[GroundingBatch]
    singles: list[GroundingBatch]
    optimizer: torch.optim.Optimizer
    cache_dir: Path
    cache: FeatureCache | None = None
    fill_seconds: float | None = None

    @classmethod
    def build(cls, p: Preset, cache_dir: Path, lmm: FrozenLMM | None = None) -> Rig:
        """The rig of preset ``p`` around ``lmm`` (a random LLaVA of ``p``'s shape when None)."""
        lmm = lmm or build_lmm(p)
        sam = build_sam(p.sam[0], **p.sam[1]).to(p.device)
        torch.manual_seed(0)
        model = FLMMModel.build(lmm, sam, base_channels=p.base_channels).to(p.device).train()
        refiner = PerPhraseRefiner(sam)
        reference = FLMMModel(lmm, model.mask_head, model.text_prompt, refiner).train()
        if p.compile:
            compile_heads(model, p.compile)
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
        rig = cls(p, model, reference, [], [], optimizer, cache_dir)
        rig.set_samples(p)
        return rig

    def set_samples(self, p: Preset) -> None:
        """From now on use ``p``'s samples (``p.samples`` of ``p.image_hw``) in batches of
        ``p.batch`` (and one by one for (a)); the models stay as they are."""
        samples = make_samples(p)
        self.preset = p
        self.batches = [
            GroundingBatch.collate(samples[i : i + p.batch]).to(p.device)
            for i in range(0, len(samples), p.batch)
        ]
        self.singles = [GroundingBatch.collate([s]).to(p.device) for s in samples]

    def autocast(self):
        """bf16 autocast around forward and losses, as Lightning's ``bf16-mixed`` does."""
        if self.preset.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.preset.device, dtype=getattr(torch, self.preset.dtype))

    def fill_cache(self) -> None:
        """The caching pass (epoch 1 with ``data.cache_dir``); timed, reported separately."""
        self.cache = FeatureCache(self.cache_dir, self.model.lmm, self.model.refiner)
        self.fill_seconds = timed(lambda: run_flmm(self, self.cache), self.preset.device)


def compile_heads(model: FLMMModel, backend: str = "inductor") -> None:
    """``torch.compile`` the trainable heads of ``model``: the U-Net mask head and SAM's prompt
    encoder + mask decoder (:meth:`SamRefiner.decode`). Wrappers, not in place: the reference
    twin shares these modules' weights but keeps running them eagerly, as the reference does."""
    model.mask_head = torch.compile(model.mask_head, backend=backend)
    model.refiner.decode = torch.compile(model.refiner.decode, backend=backend)


# ------------------------------------------------------------------------------------ the cases
def train_step(rig: Rig, model: FLMMModel, batch: GroundingBatch, capture=None) -> None:
    """Forward (from ``capture`` when given), losses, backward, clipping, AdamW step."""
    rig.optimizer.zero_grad(set_to_none=True)
    with rig.autocast():
        pred = model.decode(batch, capture) if capture is not None else model(batch)
        loss = model.losses(batch, pred)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(rig.optimizer.param_groups[0]["params"], 1.0)
    rig.optimizer.step()


def reference_capture(lmm: FrozenLMM, batch: GroundingBatch) -> CaptureOutput:
    """One sample the reference's way: eager attention with every layer's ``N x N`` weights and
    every hidden state returned, then phrase rows x image columns sliced and merged (mean)."""
    inputs = lmm.encode(batch)
    token_phrase, region = inputs.pop("token_phrase"), inputs.pop("region")
    with torch.no_grad():
        out = lmm.model(**inputs, output_attentions=True, output_hidden_states=True)
        image_cols, counts = lmm.image_columns(inputs["input_ids"])
        image_attn = [a[0][..., image_cols[0]] for a in out.attentions]  # L x (H x N x P)
        k_max = max(batch.num_phrases)
        maps = torch.stack(
            [
                torch.stack([a[:, token_phrase[0] == k].mean(1) for a in image_attn])
                for k in range(k_max)
            ]
        )  # K x L x H x P
        rows, row_phrase = phrase_rows(token_phrase)
        hidden = torch.stack(out.hidden_states[-lmm.num_text_layers :], 1)[:, :, rows[0]]
        del out, image_attn
        return CaptureOutput(
            maps=lmm.to_grid(maps[None].float(), lmm.layouts(inputs, counts), region),
            phrase_mask=torch.ones(1, k_max, dtype=torch.bool, device=lmm.device),
            hidden=hidden.float(),
            token_phrase=row_phrase,
            region=region,
        )


def set_attention(lmm: FrozenLMM, text: str, vision: str) -> None:
    """Attention implementation of the text decoder and of the vision tower."""
    lmm.model.set_attn_implementation({"text_config": text, "vision_config": vision})


def run_reference(rig: Rig) -> None:
    set_attention(rig.model.lmm, "eager", "eager")  # output_attentions needs eager
    for batch in rig.singles:
        with rig.autocast():
            capture = reference_capture(rig.model.lmm, batch)
        train_step(rig, rig.reference, batch, capture)


def run_flmm(rig: Rig, cache: FeatureCache | None = None) -> None:
    set_attention(rig.model.lmm, IMPLEMENTATION, "sdpa")
    model = rig.model.with_feature_cache(cache)
    for batch in rig.batches:
        train_step(rig, model, batch)


def run_cached(rig: Rig) -> None:
    if rig.cache is None:
        rig.fill_cache()
    run_flmm(rig, rig.cache)


@torch.no_grad()
def run_floor(rig: Rig) -> None:
    lmm = rig.model.lmm
    set_attention(lmm, "sdpa", "sdpa")
    for batch in rig.batches:
        with rig.autocast():
            inputs = lmm.encode(batch)
            del inputs["token_phrase"], inputs["region"]
            lmm.model(**inputs, logits_to_keep=1)
            rig.model.refiner.embed_images(batch.images)


RUNS = {"reference": run_reference, "flmm": run_flmm, "cached": run_cached, "floor": run_floor}


# --------------------------------------------------------------------------- timing and memory
def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(run, device: str) -> float:
    """Seconds ``run()`` takes: wall-clock on CUDA; on the CPU this process's CPU time (all its
    threads), which other jobs on a shared machine do not inflate as they do wall-clock."""
    clock = time.perf_counter if device == "cuda" else time.process_time
    synchronize(device)
    start = clock()
    run()
    synchronize(device)
    return clock() - start


def status_bytes(name: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(name)


def release_free_memory() -> None:
    """Return freed heap memory to the OS so that RSS before a pass is what is really held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_pass(rig: Rig, case: str) -> dict:
    """Seconds of one pass of ``case`` over all samples, its peak memory and the peak above what
    was held before it (bytes)."""
    return measure(lambda: RUNS[case](rig), rig.preset.device)


def measure(run, device: str) -> dict:
    """Seconds ``run()`` takes (:func:`timed`), the peak memory during it (CUDA:
    ``max_memory_allocated``; CPU: the process's peak RSS) and that peak above what was held
    before it (bytes)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        seconds = timed(run, device)
        peak = torch.cuda.max_memory_allocated()
    else:
        release_free_memory()
        before = status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        seconds = timed(run, device)
        peak = status_bytes("VmHWM")
    return {"seconds": seconds, "peak_bytes": peak, "step_bytes": peak - before}


def warm_up(rig: Rig, case: str) -> None:
    """Untimed: allocator, optimizer state, kernels; for (c) the caching pass. On the CPU one step
    on one sample is enough (nothing is compiled or tuned per shape), on CUDA a whole pass."""
    if case == "cached":
        rig.fill_cache()
        return
    saved = rig.batches, rig.singles
    if rig.preset.device == "cpu":
        rig.batches = rig.singles = rig.singles[:1]
    try:
        RUNS[case](rig)
    finally:
        rig.batches, rig.singles = saved


# ------------------------------------------------------------------------ in-process or workers
class InProcess:
    """All cases in this process on one rig (CUDA: ``max_memory_allocated`` is per process)."""

    def __init__(self, preset: Preset, cases: list[str], workdir: Path) -> None:
        self.rig = Rig.build(preset, workdir / "cache")
        for case in cases:
            warm_up(self.rig, case)

    def run(self, case: str) -> dict:
        return measure_pass(self.rig, case)

    def fill_seconds(self) -> float | None:
        return self.rig.fill_seconds

    def close(self) -> None:
        pass


class Workers:
    """One subprocess per case (CPU: its peak RSS is that case's alone); the cases are built and
    warmed up in parallel, then run one at a time."""

    def __init__(self, preset: Preset, cases: list[str], workdir: Path, threads: int) -> None:
        spec = json.dumps(dataclasses.asdict(preset))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.procs = {
            case: subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    case,
                    "--spec",
                    spec,
                    "--workdir",
                    str(workdir / case),
                    "--threads",
                    str(threads),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            for case in cases
        }
        self.ready = {case: self._reply(case) for case in cases}

    def _reply(self, case: str) -> dict:
        line = self.procs[case].stdout.readline()
        if not line:
            raise RuntimeError(f"worker {case!r} exited (code {self.procs[case].wait()})")
        return json.loads(line)

    def run(self, case: str) -> dict:
        self.procs[case].stdin.write("pass\n")
        self.procs[case].stdin.flush()
        return self._reply(case)

    def fill_seconds(self) -> float | None:
        return self.ready.get("cached", {}).get("fill_seconds")

    def close(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            proc.wait()


def worker_main(case: str, spec: str, workdir: str) -> None:
    """Build the rig, warm ``case`` up, then answer each ``pass`` line with a JSON result line."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # library prints must not reach the protocol stream
    raw = json.loads(spec)
    preset = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    rig = Rig.build(preset, Path(workdir) / "cache")
    warm_up(rig, case)
    print(json.dumps({"ready": case, "fill_seconds": rig.fill_seconds}), file=protocol, flush=True)
    for line in sys.stdin:
        if line.strip() == "pass":
            print(json.dumps(measure_pass(rig, case)), file=protocol, flush=True)


# ---------------------------------------------------------------------------------- the report
def interleaved(runner, cases: list[str], repeats: int) -> dict[str, list[dict]]:
    """``repeats`` rounds over the cases, every other round in reverse order."""
    results: dict[str, list[dict]] = {case: [] for case in cases}
    for r in range(repeats):
        for case in cases if r % 2 == 0 else cases[::-1]:
            results[case].append(runner.run(case))
    return results


def summarise(p: Preset, results: dict[str, list[dict]]) -> dict[str, dict]:
    rows = {}
    for case, passes in results.items():
        seconds = statistics.median(r["seconds"] for r in passes)
        per_step = 1 if case == "reference" else p.batch
        step = max(r["step_bytes"] for r in passes)
        rows[case] = {
            "batch": per_step,
            "samples_per_s": p.samples / seconds,
            "ms_per_sample": 1e3 * seconds / p.samples,
            "peak_mib": max(r["peak_bytes"] for r in passes) / 2**20,
            "step_mib": step / 2**20,
            "step_mib_per_sample": step / 2**20 / per_step,
            "pass_seconds": [r["seconds"] for r in passes],
        }
    return rows


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    out = {}
    if {"flmm", "reference"} <= rows.keys():
        out["b/a samples/s"] = rows["flmm"]["samples_per_s"] / rows["reference"]["samples_per_s"]
        ref_mem = max(rows["reference"]["step_mib_per_sample"], 1e-9)
        out["b/a memory/sample"] = rows["flmm"]["step_mib_per_sample"] / ref_mem
    if {"cached", "reference"} <= rows.keys():
        out["c/a samples/s"] = rows["cached"]["samples_per_s"] / rows["reference"]["samples_per_s"]
    if {"flmm", "floor"} <= rows.keys():
        out["b/d time/sample"] = rows["flmm"]["ms_per_sample"] / rows["floor"]["ms_per_sample"]
    return out


def header(name: str, p: Preset, rig_notes: dict) -> dict:
    if p.device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        cpu = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in ln]
        machine = f"{cpu[0].split(':')[1].strip() if cpu else platform.processor()}"
        machine += f", {torch.get_num_threads()} thread(s) per case of {os.cpu_count()} cores"
    return {
        "preset": name,
        "machine": machine,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shapes": dataclasses.asdict(p),
        **rig_notes,
    }


def print_report(info: dict, rows: dict[str, dict], ratio: dict[str, float]) -> None:
    p = info["shapes"]
    print(
        f"## {info['preset']}: {info['machine']}; torch {info['torch']}, "
        f"transformers {info['transformers']}"
    )
    vision = "CLIP tower {} wide x {} layers, {} heads".format(*p["vision"])
    fill = f"caching pass {info['fill_ms_per_sample']:.0f} ms/sample"
    if info["isolated_processes"]:
        fill += " (during the cases' parallel warm-up: not comparable)"
    print(
        f"LMM {p['family']}: {p['layers']} decoder layer(s) x {p['width']} wide, {p['heads']} "
        f"heads, MLP {p['mlp']}, {p['dtype']}; {info['image_tokens']} image tokens, sequence "
        f"{info['sequence']}; attention channels {info['channels']}; {vision}; SAM {info['sam']}; "
        f"images {p['image_hw'][0]} x {p['image_hw'][1]}, {p['phrases']} phrases each; "
        f"B = {p['batch']}, {p['samples']} samples per pass, median of {p['repeats']} "
        f"interleaved passes ({info['clock']}); {fill}; each case in its own process: "
        f"{info['isolated_processes']}; (b) and (c)'s heads compiled: {p['compile'] or 'no'}"
    )
    print("| case | batch | samples/s | ms/sample | peak MiB | step MiB | step MiB/sample |")
    print("|---|---|---|---|---|---|---|")
    for case, r in rows.items():
        print(
            f"| {LABELS[case]} {case} | {r['batch']} | {r['samples_per_s']:.3f} | "
            f"{r['ms_per_sample']:.0f} | {r['peak_mib']:.0f} | {r['step_mib']:.0f} | "
            f"{r['step_mib_per_sample']:.0f} |"
        )
    print("\n| ratio | this run | target (where the issue sets it) | holds here |")
    print("|---|---|---|---|")
    for name, value in ratio.items():
        target, at_least, where = TARGETS[name]
        holds = value >= target if at_least else value <= target
        sign = ">=" if at_least else "<="
        print(
            f"| {name} | {value:.2f}x | {sign} {target}x ({where}) | {'yes' if holds else 'no'} |"
        )


def shape_notes(p: Preset) -> dict:
    """Image tokens, sequence length, channels and the SAM's shape of preset ``p`` (tiny probe)."""
    lmm = build_lmm(
        dataclasses.replace(
            p,
            layers=1,
            width=64,
            heads=p.heads,
            mlp=64,
            vision=(32, 1, 2),
            vocab=None,
            device="cpu",
            dtype="float32",
        )
    )
    batch = GroundingBatch.collate(make_samples(dataclasses.replace(p, samples=1)))
    inputs = lmm.encode(batch)
    image_tokens = int((inputs["input_ids"] == lmm.image_token_id).sum())
    variant, sizes = p.sam
    if variant == "tiny":
        size = sizes.get("img_size", 96)
        sam = (
            f"tiny ViT {sizes.get('embed_dim', 64)} wide x {sizes.get('depth', 2)} at "
            f"{size} px, decoder {sizes.get('prompt_dim', 64)} wide"
        )
    else:
        sam = f"{variant} at 1024 px"
    return {
        "image_tokens": image_tokens,
        "sequence": int(inputs["input_ids"].shape[1]),
        "channels": p.layers * p.heads * (2 if p.family == "llava_next" else 1),
        "sam": sam,
    }


def bench(name: str, p: Preset, cases: list[str], isolate: bool, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if isolate:
            runner = Workers(p, cases, Path(tmp), threads)
        else:
            runner = InProcess(p, cases, Path(tmp))
        try:
            results = interleaved(runner, cases, p.repeats)
            fill = runner.fill_seconds()
        finally:
            runner.close()
    rows = summarise(p, results)
    notes = shape_notes(p)
    notes["fill_ms_per_sample"] = 1e3 * fill / p.samples if fill else float("nan")
    notes["isolated_processes"] = isolate
    notes["clock"] = "wall-clock" if p.device == "cuda" else "process CPU time"
    info = header(name, p, notes)
    ratio = ratios(rows)
    print_report(info, rows, ratio)
    return {**info, "rows": rows, "ratios": ratio, "targets": TARGETS}


# ------------------------------------------------------------------------------- profiling (b)
def flmm_phases(rig: Rig) -> dict[str, float]:
    """Milliseconds per sample of each phase of (b)'s training step, and of (d)'s forward."""
    lmm, model, device = rig.model.lmm, rig.model, rig.preset.device
    spent: dict[str, float] = {}

    now = time.perf_counter if device == "cuda" else time.process_time  # as timed() does

    @contextlib.contextmanager
    def clock(name: str):
        synchronize(device)
        start = now()
        yield
        synchronize(device)
        spent[name] = spent.get(name, 0.0) + 1e3 * (now() - start) / rig.preset.samples

    params = rig.optimizer.param_groups[0]["params"]
    for batch in rig.batches:
        set_attention(lmm, IMPLEMENTATION, "sdpa")
        rig.optimizer.zero_grad(set_to_none=True)
        with rig.autocast():
            with clock("(b) LMM forward with capture"):
                capture = lmm(batch)
            with clock("(b) SAM image encoder"):
                embedded = model.refiner.embed_images(batch.images)
            with clock("(b) heads forward (mask head, text prompts, SAM decoder)"):
                pred = model.decode(batch, capture, embedded)
            with clock("(b) losses"):
                loss = model.losses(batch, pred)["loss"]
        with clock("(b) backward"):
            loss.backward()
        with clock("(b) clip + AdamW"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            rig.optimizer.step()
        set_attention(lmm, "sdpa", "sdpa")
        inputs = lmm.encode(batch)
        del inputs["token_phrase"], inputs["region"]
        with torch.no_grad(), rig.autocast(), clock("(d) LMM sdpa forward"):
            lmm.model(**inputs, logits_to_keep=1)
    return spent


def profile(name: str, p: Preset) -> None:
    """Phase times of (b) vs (d), and the ops that dominate one (b) pass (torch.profiler)."""
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig.build(p, Path(tmp))
        warm_up(rig, "flmm")
        spent = flmm_phases(rig)
        print(f"## {name}: (b)'s step by phase, ms/sample (B = {p.batch}, {p.samples} samples)")
        print("| phase | ms/sample |\n|---|---|")
        for phase, ms in spent.items():
            print(f"| {phase} | {ms:.0f} |")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if p.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            run_flmm(rig)
        key = "self_cuda_time_total" if p.device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=15))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", action="append", choices=list(PRESETS))
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--batch-size", type=int, help="B of (b)-(d) (the preset's by default)")
    parser.add_argument("--samples", type=int, help="samples per pass (a multiple of B)")
    parser.add_argument("--repeats", type=int, help="interleaved passes per case (median)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per case")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        metavar="BACKEND",
        help="torch.compile (b) and (c)'s mask head and SAM prompt encoder + mask decoder "
        "(backend inductor unless named); (a) stays eager, as the reference runs",
    )
    parser.add_argument("--in-process", action="store_true", help="CPU: no subprocess per case")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--profile", action="store_true", help="profile (b) instead (in-process)")
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        worker_main(args.worker, args.spec, args.workdir)
        return []
    reports = []
    for name in args.preset or ["cpu"]:
        p = PRESETS[name]
        overrides = {
            "batch": args.batch_size,
            "samples": args.samples,
            "repeats": args.repeats,
            "compile": args.compile,
        }
        p = dataclasses.replace(p, **{k: v for k, v in overrides.items() if v is not None})
        if p.samples % p.batch:
            raise SystemExit(f"--samples ({p.samples}) must be a multiple of B ({p.batch})")
        if p.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"preset {name!r} needs a CUDA device")
        if args.profile:
            profile(name, p)
            continue
        isolate = p.device == "cpu" and not args.in_process
        reports.append(bench(name, p, args.cases, isolate, args.threads))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=1) + "\n")
    return reports


if __name__ == "__main__":
    main()
