"""A quantized frozen LMM: int8 (torchao) keeps capture, hidden states and chat on the CPU;
bitsandbytes 8bit / 4bit on CUDA; one-line errors for what cannot run here."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_hostile_inputs import one_line_error
from torch import nn

from flmm.errors import MissingExtraError
from flmm.foundation.cache import SHIPPED
from flmm.lmm import FrozenLMM
from flmm.lmm.fingerprint import fingerprint

LMM = str(SHIPPED["tiny_llava"])  # pretrained: its attention points at what phrases name
QUESTION = "what is in the image?"


@pytest.fixture(scope="module")
def pair() -> tuple[FrozenLMM, FrozenLMM]:
    """The shipped tiny LLaVA in float32 and with int8 weights."""
    return FrozenLMM.from_pretrained(LMM), FrozenLMM.from_pretrained(LMM, quantization="int8")


def int8_weight(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer whose weight torchao stores as int8."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) and getattr(weight, "qdata", None) is not None


def test_int8_quantizes_every_linear_layer_but_the_output_head(pair):
    _, int8 = pair
    linear = {n for n, m in int8.model.named_modules() if isinstance(m, nn.Linear)}
    quantized = {n for n, m in int8.model.named_modules() if int8_weight(m)}
    assert linear - quantized == {"lm_head"} and len(quantized) == 42
    q_proj = int8.model.get_submodule("model.language_model.layers.0.self_attn.q_proj")
    assert q_proj.weight.qdata.dtype == torch.int8 and q_proj.weight.qdata.shape == (128, 128)
    assert int8.quantization == "int8" and int8.model.dtype == torch.float32
    assert not any(p.requires_grad for p in int8.parameters())
    int8.train()
    assert not any(m.training for m in int8.modules())


def test_int8_capture_stays_close_to_float32(pair, ragged_batch):
    """Per-channel int8 rounds each weight to 1/254 of its row's range (<= 0.4%). On this model
    that moves the hidden states by 0.6% and any attention value by at most 0.006 (of values up
    to 0.34); bfloat16 moves them by 0.5% and 0.003. The bounds allow about 3x that; 4-bit
    weights (0.16 and 15.6%) would fail them."""
    plain, int8 = (lmm(ragged_batch) for lmm in pair)
    real = plain.phrase_mask
    assert torch.equal(plain.phrase_mask, int8.phrase_mask)
    assert (int8.maps - plain.maps).abs().max() < 0.02
    maps = torch.stack([int8.maps[real].flatten(), plain.maps[real].flatten()])
    assert torch.corrcoef(maps)[0, 1] > 0.999
    assert (int8.hidden - plain.hidden).norm() / plain.hidden.norm() < 0.02


def test_int8_lmm_answers_and_has_a_fingerprint(pair, ragged_batch):
    plain, int8 = pair
    image = ragged_batch.images[2].numpy()
    answer = int8.generate([image], QUESTION, max_new_tokens=8, do_sample=False)
    assert answer.strip() and answer == plain.generate(
        [image], QUESTION, max_new_tokens=8, do_sample=False
    )
    # the frozen-LMM check of training hashes the stored int8 values (and scales)
    stored = int8.model.get_submodule("model.language_model.layers.0.mlp.up_proj").weight.qdata
    before = fingerprint(int8.model)
    stored[0, 0] += 1
    changed = fingerprint(int8.model)
    stored[0, 0] -= 1
    assert changed != before == fingerprint(int8.model)


def test_an_unknown_quantization_is_one_line(capsys):
    line = one_line_error(capsys, FrozenLMM.from_pretrained, LMM, quantization="fp4")
    assert "unknown quantization 'fp4'" in line and "int8, 8bit, 4bit" in line


@pytest.mark.parametrize("name", ["8bit", "4bit"])
def test_bitsandbytes_without_cuda_is_one_line(name, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = one_line_error(capsys, FrozenLMM.from_pretrained, LMM, quantization=name)
    assert f"quantization '{name}'" in line and "needs a CUDA GPU" in line
    assert "--quantization int8" in line


@pytest.mark.parametrize(
    "name, package, extra",
    [("8bit", "bitsandbytes", "quant-cuda"), ("4bit", "bitsandbytes", "quant-cuda"),
     ("int8", "torchao", "quant")],
)  # fmt: skip
def test_a_missing_package_names_its_extra(name, package, extra, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == package else find_spec(n, *a)
    )
    with pytest.raises(MissingExtraError, match=rf"pip install 'flmm\[{extra}\]'") as info:
        FrozenLMM.from_pretrained(LMM, quantization=name)
    assert f"needs {package}" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("name, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_bitsandbytes_quantizes_on_cuda_and_keeps_capture(name, layer, ragged_batch):
    pytest.importorskip("bitsandbytes", reason="pip install 'flmm[quant-cuda]'")
    plain = FrozenLMM.from_pretrained(LMM, device_map="cuda:0")  # auto: bfloat16
    quantized = FrozenLMM.from_pretrained(LMM, quantization=name)
    assert layer in {type(m).__name__ for m in quantized.model.modules()}
    assert quantized.device.type == "cuda" and quantized.model.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in quantized.parameters()) and not quantized.training
    first, second = plain(ragged_batch), quantized(ragged_batch)
    real = first.phrase_mask
    maps = torch.stack([second.maps[real].flatten(), first.maps[real].flatten()])
    assert torch.corrcoef(maps)[0, 1] > (0.99 if name == "8bit" else 0.95)
    image = ragged_batch.images[2].numpy()
    assert quantized.generate([image], QUESTION, max_new_tokens=8, do_sample=False).strip()
