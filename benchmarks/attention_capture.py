"""Time and peak memory of attention capture vs plain sdpa vs eager ``output_attentions=True``.

A random Llama decoder with LLaVA-1.5-7B's layer shapes (hidden 4096, 32 heads, MLP 11008) runs one
prefill over ``5 + P + 60`` tokens: P image tokens (576 = LLaVA-1.5, 2880 ~ LLaVA-NeXT any-res)
and 60 text tokens, 10 of which are phrase rows (4 phrases). Cases, same weights and inputs:
  (a) sdpa       plain forward, what a frozen LMM costs anyway;
  (b) capture    "flmm_capture": sdpa + phrase-row softmax over image columns, merged per phrase;
  (c) eager      output_attentions=True, every layer's full N x N weights (the reference code).

Time: median over ``--repeats`` forwards, the cases interleaved round-robin so that load from
other processes hits them alike. Peak memory: the high-water mark of tensor memory allocated by
the forward above what was held before it (weights and inputs excluded; returned outputs such as
eager's attentions included, as they are alive at the end). On CUDA ``torch.cuda.max_memory_allocated``;
on CPU a ``TorchDispatchMode`` that adds the storage bytes of every tensor an aten op creates and
subtracts them when the storage is freed (views and in-place results, which alias an input,
are not new memory); scratch buffers internal to one kernel are invisible to it.

    python benchmarks/attention_capture.py                   # CPU: 1 layer, ~3 min
    python benchmarks/attention_capture.py --layers 32 --repeats 5   # GPU: the full 7B decoder
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaModel

from flmm.attention.capture import IMPLEMENTATION, capture, register

CASES = {"sdpa": "sdpa", "capture": IMPLEMENTATION, "eager": "eager"}
PREFIX, TEXT, PHRASE_ROWS, PHRASES = 5, 60, 10, 4


def build_decoder(layers: int, implementation: str, device: str, dtype: torch.dtype) -> LlamaModel:
    """A random decoder with LLaVA-1.5-7B's (Vicuna-7B's) layer shapes and a small vocabulary."""
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    register()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(config).to(dtype).eval()
    model.set_attn_implementation(implementation)
    return model


def capture_indices(image_tokens: int, device: str) -> tuple[torch.Tensor, ...]:
    """Phrase rows (the first 10 text tokens after the image, 4 phrases) and image columns."""
    start = PREFIX + image_tokens + 5
    rows = torch.arange(start, start + PHRASE_ROWS, device=device)[None]
    row_phrase = (torch.arange(PHRASE_ROWS, device=device) * PHRASES // PHRASE_ROWS)[None]
    cols = torch.arange(PREFIX, PREFIX + image_tokens, device=device)[None]
    return rows, row_phrase, cols


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of live tensor storages created by aten ops while the mode is active (CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors using it]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        address, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or (address in inputs and address not in self.live):
            return
        entry = self.live.setdefault(address, [size, 0])
        if entry[1] == 0:
            self.current += size
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(tensor, self._release, address)

    def _release(self, address: int) -> None:
        entry = self.live[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[address]


def peak_memory(run, device: str) -> int:
    """Peak bytes allocated by ``run()`` above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LiveTensorPeak() as mode:
        run()
    return mode.peak


def forward(model: LlamaModel, case: str, embeds: torch.Tensor, indices) -> None:
    if case == "capture":
        with capture(*indices, num_phrases=PHRASES) as state:
            model(inputs_embeds=embeds)
        assert len(state.maps) == model.config.num_hidden_layers
    elif case == "eager":
        out = model(inputs_embeds=embeds, output_attentions=True)
        assert len(out.attentions) == model.config.num_hidden_layers
    else:
        model(inputs_embeds=embeds)


def timed(run, device: str) -> float:
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(model: LlamaModel, image_tokens: int, repeats: int, warmup: int) -> dict[str, dict]:
    """Median time and peak memory of each case for one sequence length."""
    device, dtype = model.device.type, model.dtype
    embeds = torch.randn(1, PREFIX + image_tokens + TEXT, 4096, device=device, dtype=dtype)
    indices = capture_indices(image_tokens, device)
    runs = {case: (lambda case=case: forward(model, case, embeds, indices)) for case in CASES}
    times: dict[str, list[float]] = {case: [] for case in CASES}
    with torch.no_grad():
        for step in range(warmup + repeats):
            for case, run in runs.items():
                model.set_attn_implementation(CASES[case])
                elapsed = timed(run, device)
                if step >= warmup:
                    times[case].append(elapsed)
        peaks = {}
        for case, run in runs.items():
            model.set_attn_implementation(CASES[case])
            peaks[case] = peak_memory(run, device)
    return {
        case: {"time_s": statistics.median(times[case]), "peak_bytes": peaks[case]}
        for case in CASES
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--layers", type=int, default=1, help="decoder layers (LLaVA-1.5-7B has 32)"
    )
    parser.add_argument("--image-tokens", type=int, nargs="+", default=[576, 2880])
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per case (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed forwards per case")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_decoder(args.layers, "sdpa", device, dtype)
    print(
        f"device={device} dtype={dtype} layers={args.layers} repeats={args.repeats} warmup={args.warmup}"
    )
    print(
        f"{'image tok':>9} {'seq':>5} {'case':>8} {'time s':>8} {'peak MiB':>9} {'time/a':>7} {'mem/a':>7}"
    )
    for image_tokens in args.image_tokens:
        results = bench(model, image_tokens, args.repeats, args.warmup)
        base = results["sdpa"]
        for case, res in results.items():
            print(
                f"{image_tokens:>9} {PREFIX + image_tokens + TEXT:>5} {case:>8} {res['time_s']:>8.3f} "
                f"{res['peak_bytes'] / 2**20:>9.1f} {res['time_s'] / base['time_s']:>7.2f} "
                f"{res['peak_bytes'] / max(base['peak_bytes'], 1):>7.2f}"
            )


if __name__ == "__main__":
    main()
