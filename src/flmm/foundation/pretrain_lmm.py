"""Pretrain the synthetic world's tiny LLaVA on the world's image-text data, then save it.

The model is the real ``LlavaForConditionalGeneration`` built by :mod:`flmm.foundation.tiny_llava`;
it learns, end to end (vision tower, projector, language model), to describe scenes in F-LMM's own
prompt format ("Please give me a description of the image." -> objects and where they are) and
to answer questions about them. Loss: next-token cross-entropy on the answer tokens only.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from flmm.data.synthetic.corpus import pretraining_pairs

log = logging.getLogger(__name__)


def chat_prompts(processor, prompt: str, answer: str) -> tuple[str, str]:
    """The chat-template text with and without the answer (the latter ends at the answer's start).

    The answer ends with the end-of-sequence token, so the model learns to stop.
    """
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    prefix = processor.apply_chat_template([user], add_generation_prompt=True)
    full = processor.apply_chat_template(
        [user, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    )
    return prefix, full.rstrip() + processor.tokenizer.eos_token


def make_batch(processor, pairs: list[tuple[np.ndarray, str, str]]) -> dict[str, torch.Tensor]:
    """Tokenise (image, prompt, answer) triples; labels keep only the answer tokens."""
    prefixes, fulls = zip(*(chat_prompts(processor, p, a) for _, p, a in pairs))
    images = [img for img, _, _ in pairs]
    inputs = processor(images=images, text=list(fulls), padding=True, return_tensors="pt")
    prefix_ids = processor(images=images, text=list(prefixes), padding=True, return_tensors="pt")
    prefix_len = prefix_ids["attention_mask"].sum(1)
    labels = inputs["input_ids"].clone()
    positions = torch.arange(labels.shape[1])[None]
    labels[positions < prefix_len[:, None]] = -100
    labels[inputs["attention_mask"] == 0] = -100
    inputs["labels"] = labels
    return inputs


def pretrain_tiny_llava(
    model_dir: str | Path,
    out_dir: str | Path,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup: int = 100,
    seed: int = 0,
    image_size: int = 96,
    log_every: int = 100,
    corpus: dict | None = None,
    device: str | None = None,
) -> list[float]:
    """Train the tiny LLaVA saved in ``model_dir`` for ``steps`` and ``save_pretrained`` it to ``out_dir``.

    ``corpus``: keyword arguments of :func:`~flmm.data.synthetic.corpus.pretraining_pairs` (the
    mix of captions and questions). ``device``: where to train (CUDA when available if None).
    Returns the training losses (one per step).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def schedule(s: int) -> float:  # linear warm-up times cosine decay (kept: the cache's recipe)
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    pairs = pretraining_pairs(rng, image_size=image_size, **(corpus or {}))
    losses: list[float] = []
    start = time.time()
    columns = (
        TextColumn("pretraining tiny LLaVA"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("pretrain", total=steps, loss=float("nan"))
        for step in range(steps):
            batch = make_batch(processor, [next(pairs) for _ in range(batch_size)]).to(device)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            progress.update(task, advance=1, loss=float(np.mean(losses[-log_every:])))
            if (step + 1) % log_every == 0:
                log.info(
                    "tiny LLaVA step %d/%d, loss %.3f, %.0f s",
                    step + 1,
                    steps,
                    np.mean(losses[-log_every:]),
                    time.time() - start,
                )
    model.cpu().eval()
    save_model(
        model,
        processor,
        out_dir,
        {
            "steps": steps,
            "seed": seed,
            "corpus": corpus or {},
            "device": device.type,
            "seconds": round(time.time() - start, 1),
            "final_loss": float(np.mean(losses[-log_every:])) if losses else None,
        },
    )
    return losses


def save_model(model, processor, out_dir: str | Path, info: dict) -> None:
    """``save_pretrained`` model and processor, plus a small JSON of how it was trained."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "pretraining.json").write_text(json.dumps(info, indent=2))
