"""Pretrain the synthetic world's tiny LLaVA on the world's image-text data, then save it.

The model is the real ``LlavaForConditionalGeneration`` built by :mod:`flmm.foundation.tiny_llava`;
it learns, end to end (vision tower, projector, language model), to describe scenes in F-LMM's own
prompt format ("Please give me a description of the image." -> objects and where they are) and
to answer questions about them. Loss: next-token cross-entropy on the answer tokens only.
Scenes come from their own RNG stream (:data:`~flmm.data.synthetic.streams.Stream.PRETRAIN`),
never the world's val or test scenes. With ``state_path`` the run saves its whole state every
``checkpoint_every`` steps and a rerun resumes from it, drawing the same samples as an unbroken run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from flmm.data.synthetic.corpus import (
    pixel_labels,
    pretraining_pairs,
)
from flmm.data.synthetic.questions import ObjectStats
from flmm.data.synthetic.streams import Stream
from flmm.data.synthetic.world import COLOURS, SHAPES, sample_scene
from flmm.frame import pad_to_square

log = logging.getLogger(__name__)


def conversation(
    processor, turns: list[tuple[str, str]], n_images: int = 1
) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of a conversation, and each answer's token span in it.

    The first user turn holds ``n_images`` images, then its prompt; each answer ends with the
    end-of-sequence token, so the model learns to stop. Spans ``(start, end)`` index the
    tokenizer's ids of the text (``<image>`` still one token each).
    """
    tokenizer, messages, spans = processor.tokenizer, [], []
    for k, (prompt, answer) in enumerate(turns):
        content = [{"type": "image"}] * (n_images if k == 0 else 0)
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": prompt}]})
        prefix = processor.apply_chat_template(messages, add_generation_prompt=True)
        reply = [{"type": "text", "text": answer + tokenizer.eos_token}]
        messages.append({"role": "assistant", "content": reply})
        full = processor.apply_chat_template(messages).rstrip()
        spans.append((len(tokenizer(prefix).input_ids), len(tokenizer(full).input_ids)))
    return full, spans


def make_batch(
    processor, samples: list[tuple[list[np.ndarray], list[tuple[str, str]]]]
) -> dict[str, torch.Tensor]:
    """Tokenise ``(images, [(prompt, answer), ...])`` conversations; labels keep only the answers.

    Each sample's images (``H x W x 3`` uint8; none for a text-only sample) are padded to centred
    squares with the mean colour, as :class:`~flmm.lmm.FrozenLMM` pads LLaVA's images (a crop need
    not be square).
    """
    texts, spans = zip(*(conversation(processor, turns, len(ims)) for ims, turns, *_ in samples))
    fill = np.round(np.asarray(processor.image_processor.image_mean) * 255).astype(np.uint8)
    images = [pad_to_square(img, fill) for ims, *_ in samples for img in ims]
    inputs = processor(images=images or None, text=list(texts), padding=True, return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    for i, (text, answers) in enumerate(zip(texts, spans)):
        # the processor expands each <image> into the image's tokens, all before the answers
        shift = int(inputs["attention_mask"][i].sum()) - len(processor.tokenizer(text).input_ids)
        for start, end in answers:
            labels[i, start + shift : end + shift] = inputs["input_ids"][
                i, start + shift : end + shift
            ]
    inputs["labels"] = labels
    return inputs


class PatchProbe(nn.Module):
    """Linear heads on the patch features the projector reads, predicting each patch's share of
    pixels of every colour and every shape (background included): dense supervision for the tiny
    vision tower, which a real LLaVA gets from CLIP pretraining. Not part of the saved model."""

    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.heads = nn.ModuleList(
            [nn.Linear(width, len(COLOURS) + 1), nn.Linear(width, len(SHAPES) + 1)]
        )

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Soft cross-entropy. ``features``: ``B x P x C`` (``P = (H / patch)^2``, row-major);
        ``labels``: ``B x 2 x H x W`` integer colour and shape indices (0: background)."""
        total = features.new_zeros(())
        for i, head in enumerate(self.heads):
            n = head.out_features
            target = patch_shares(labels[:, i], n, self.patch)
            total = total + F.cross_entropy(head(features).reshape(-1, n), target.reshape(-1, n))
        return total


def patch_shares(labels: torch.Tensor, classes: int, patch: int) -> torch.Tensor:
    """Each ``patch x patch`` patch's share of pixels of every class: ``B x P x classes`` (``P``
    row-major) from ``B x H x W`` integer ``labels``."""
    onehot = F.one_hot(labels.long(), classes).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(onehot, patch).flatten(2).transpose(1, 2)


def first_image_features(model, batch, run) -> tuple[torch.Tensor, torch.Tensor]:
    """``run()``'s result and the projector's input for each sample's first image, ``B x P x C``
    (samples may hold a crop after their image)."""
    seen = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: seen.append(args[0])
    )
    try:
        out = run()
    finally:
        hook.remove()
    image_token = model.config.image_token_id
    per_image = seen[0].shape[1]
    counts = (batch["input_ids"] == image_token).sum(1) // per_image
    first = torch.cumsum(counts, 0) - counts
    return out, seen[0][first]


class PretrainState:
    """Everything a pretraining run needs to go on exactly where it stopped: the model, optimiser
    and scheduler, the corpus's generator and object counts, the torch RNG, the losses so far."""

    def __init__(self, model, probe, optimizer, scheduler, rng: np.random.Generator) -> None:
        self.model, self.probe, self.optimizer, self.scheduler = model, probe, optimizer, scheduler
        self.rng, self.stats, self.losses, self.seconds = rng, ObjectStats(), [], 0.0

    def save(self, path: Path) -> None:
        """Write the state to ``path`` atomically (a temporary file, then renamed)."""
        state = {
            "model": self.model.state_dict(),
            "probe": self.probe.state_dict() if self.probe else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.rng.bit_generator.state,
            "stats": (self.stats.frequency, self.stats.cooc),
            "torch_rng": torch.get_rng_state(),
            "losses": self.losses,
            "seconds": self.seconds,
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load(self, path: Path) -> None:
        """Restore the state saved at ``path``."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"], strict=True)
        if self.probe:
            self.probe.load_state_dict(state["probe"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.bit_generator.state = state["rng"]
        self.stats.frequency, self.stats.cooc = state["stats"]
        torch.set_rng_state(state["torch_rng"])
        self.losses, self.seconds = state["losses"], state["seconds"]


def pretrain_vision_tower(
    model_dir: str | Path, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0
) -> None:
    """Train the vision tower of the tiny LLaVA saved in ``model_dir`` on its own and save the
    model back: a :class:`PatchProbe` on the layer the projector reads learns each patch's
    colour and shape shares from the scenes' exact masks, as CLIP is trained before LLaVA.

    Language training alone never teaches the tower shape (docs/development/tiny_llava.md,
    "The vision stage"). Scenes come from their own RNG stream
    (``[seed, Stream.VISION]``);
    CUDA when available."""
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    tower, config = model.model.vision_tower.to(device).train(), model.config
    probe = PatchProbe(config.vision_config.hidden_size, config.vision_config.patch_size)
    probe.to(device)
    optimizer = torch.optim.AdamW([*tower.parameters(), *probe.parameters()], lr, weight_decay=0.01)
    rng, size = np.random.default_rng([seed, Stream.VISION]), config.vision_config.image_size
    for step in range(1, steps + 1):
        scenes = [sample_scene(rng, size) for _ in range(batch_size)]
        pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")
        hidden = tower(pixels["pixel_values"].to(device), output_hidden_states=True).hidden_states
        labels = torch.from_numpy(np.stack([pixel_labels(s) for s in scenes])).to(device)
        loss = probe.loss(hidden[config.vision_feature_layer][:, 1:], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            log.info("tiny LLaVA vision tower step %d/%d, probe loss %.3f", step, steps, loss)
    model.cpu().eval().save_pretrained(model_dir)


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
    state_path: str | Path | None = None,
    checkpoint_every: int = 100,
    vision_aux: float = 0.0,
    stream: int = Stream.PRETRAIN,
) -> list[float]:
    """Train the tiny LLaVA saved in ``model_dir`` for ``steps`` and ``save_pretrained`` it to ``out_dir``.

    ``corpus``: keyword arguments of :func:`~flmm.data.synthetic.corpus.pretraining_pairs` (the
    mix of captions and questions). ``device``: where to train (CUDA when available if None).
    ``state_path``: resume from this file if it exists, save to it every ``checkpoint_every``
    steps (it is deleted when the run ends). ``vision_aux``: weight of the :class:`PatchProbe`
    loss added to the language loss (0: none). ``stream``: the RNG stream of the scenes (a later
    stage draws scenes of its own). Returns the training losses (one per step).
    """
    torch.manual_seed(seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.to(device).train()
    vision = model.config.vision_config
    probe = PatchProbe(vision.hidden_size, vision.patch_size).to(device) if vision_aux else None
    params = [*model.parameters(), *(probe.parameters() if probe else [])]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def schedule(s: int) -> float:  # linear warm-up times cosine decay (kept: the cache's recipe)
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = np.random.default_rng([seed, stream])
    state = PretrainState(model, probe, optimizer, scheduler, rng)
    state_path = Path(state_path) if state_path else None
    if state_path and state_path.is_file():
        state.load(state_path)
        log.info("tiny LLaVA: resumed at step %d from %s", len(state.losses), state_path)
    pairs = pretraining_pairs(state.rng, image_size=image_size, stats=state.stats, **(corpus or {}))
    _train(
        state,
        processor,
        pairs,
        steps,
        batch_size,
        device,
        log_every,
        state_path,
        checkpoint_every,
        vision_aux,
    )
    model.cpu().eval()
    losses = state.losses
    save_model(
        model,
        processor,
        out_dir,
        {
            "steps": steps,
            "seed": seed,
            "corpus": corpus or {},
            "vision_aux": vision_aux,
            "stream": stream,
            "device": device.type,
            "seconds": round(state.seconds, 1),
            "final_loss": float(np.mean(losses[-log_every:])) if losses else None,
        },
    )
    if state_path:
        state_path.unlink(missing_ok=True)
    return losses


def _train(state, processor, pairs, steps, batch_size, device, log_every, state_path, every, aux):
    """Take the remaining optimiser steps, saving the state every ``every`` steps."""
    model, losses = state.model, state.losses
    columns = (
        TextColumn("pretraining tiny LLaVA"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("pretrain", total=steps, completed=len(losses), loss=float("nan"))
        while len(losses) < steps:
            start = time.time()
            samples = [next(pairs) for _ in range(batch_size)]
            batch = make_batch(processor, samples).to(device)
            loss = step_loss(state, batch, samples, aux)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            state.optimizer.step()
            state.scheduler.step()
            losses.append(loss.item())
            state.seconds += time.time() - start
            step = len(losses)
            progress.update(task, completed=step, loss=float(np.mean(losses[-log_every:])))
            if step % log_every == 0:
                log.info(
                    "tiny LLaVA step %d/%d, loss %.3f, %.0f s",
                    step,
                    steps,
                    np.mean(losses[-log_every:]),
                    state.seconds,
                )
            if state_path and step % every == 0 and step < steps:
                state.save(state_path)


def step_loss(state: PretrainState, batch, samples, aux: float) -> torch.Tensor:
    """The language loss, plus ``aux`` times the probe's loss on the samples' first images."""
    if not aux:
        return state.model(**batch).loss
    out, features = first_image_features(state.model, batch, lambda: state.model(**batch))
    labels = torch.from_numpy(np.stack([s.labels for s in samples])).to(features.device)
    return out.loss + aux * state.probe.loss(features, labels)


def save_model(model, processor, out_dir: str | Path, info: dict) -> None:
    """``save_pretrained`` model and processor, plus a small JSON of how it was trained."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "pretraining.json").write_text(json.dumps(info, indent=2))
