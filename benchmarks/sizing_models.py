"""A headline checkpoint's shape in a precision, for ``gpu_sizing.py``: a random model built on
the device in bf16 and saved once, then loaded with ``FrozenLMM.from_pretrained`` in bf16, 4-bit
or 8-bit (bitsandbytes, CUDA) or int8 (CPU); or quantized in memory, without the disk."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import time
from pathlib import Path

import torch
import train_throughput as tt
import transformers

from flmm.foundation.tiny_models import build_tiny_lmm
from flmm.lmm import FrozenLMM
from flmm.lmm.families import get_family

QUANTIZATION = {"bf16": None, "4bit": "4bit", "8bit": "8bit", "int8": "int8"}
PRESET_FAMILIES = ("llava", "llava_next")  # what train_throughput.build_lmm builds at 7B


class NotMeasured(Exception):
    """A step that was not run; the message says why."""


def build_folder(family: str, out: Path, preset: tt.Preset, smoke: bool) -> str:
    """Save a random ``family`` model + processor to ``out`` (full depth, built on
    ``preset.device`` in bf16; tiny with ``smoke``); returns which builder made it."""
    if smoke:
        build_tiny_lmm(out, family)
        return "flmm.foundation.tiny_models"
    if importlib.util.find_spec("flmm.foundation.real_shape"):
        real_shape = importlib.import_module("flmm.foundation.real_shape")
        with torch.device(preset.device), tt.default_dtype(torch.bfloat16):
            real_shape.build_real_shape(family, out, dtype="bfloat16")
        return "flmm.foundation.real_shape (full depth)"
    if family not in PRESET_FAMILIES:
        raise NotMeasured(f"no full-depth {family} builder here (flmm.foundation.real_shape)")
    lmm = tt.build_lmm(preset)  # LLaVA-1.5 / NeXT-7B's shape, built on the GPU
    lmm.model.save_pretrained(out)
    lmm.processor.save_pretrained(out)
    return "train_throughput.build_lmm (LLaVA 7B shape)"


def load_lmm(folder: Path, family: str, precision: str, device: str) -> FrozenLMM:
    """``FrozenLMM.from_pretrained`` of ``folder`` in ``precision`` on ``device`` (bf16 for
    everything not quantized)."""
    params = inspect.signature(FrozenLMM.from_pretrained).parameters
    kwargs = {"family": family, "dtype": "bfloat16"}
    quantization = QUANTIZATION[precision]
    if quantization in ("4bit", "8bit") and device != "cuda":
        raise NotMeasured("bitsandbytes 8-bit / 4-bit needs CUDA")
    if quantization:
        if "quantization" not in params:
            raise NotMeasured("FrozenLMM.from_pretrained takes no quantization= in this flmm")
        kwargs["quantization"] = quantization
    if device == "cuda" and "device_map" in params:
        kwargs["device_map"] = device
    lmm = FrozenLMM.from_pretrained(str(folder), **kwargs)
    return lmm if "device_map" in kwargs else lmm.to(device)


def quantize_in_memory(folder: Path, family: str) -> dict:
    """The other route to a 4-bit model, without the disk: random bf16 weights built on the GPU
    from ``folder``'s config, quantized (NF4) by transformers' bitsandbytes quantizer as
    ``from_pretrained(None, state_dict=...)`` loads them. Seconds of both parts."""
    model_class = getattr(transformers, get_family(family).model_class)
    config = transformers.AutoConfig.from_pretrained(folder)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    start = time.perf_counter()
    with torch.device("cuda"), tt.default_dtype(torch.bfloat16):
        model = model_class(config)
    built = time.perf_counter()
    quantized = model_class.from_pretrained(
        None,
        config=config,
        state_dict=model.state_dict(),
        quantization_config=quantization,
        device_map={"": torch.cuda.current_device()},
    )
    torch.cuda.synchronize()
    done = time.perf_counter()
    del model, quantized
    note = f"build {built - start:.1f} s + quantize {done - built:.1f} s"
    return {"seconds_per_pass": done - start, "note": note}
