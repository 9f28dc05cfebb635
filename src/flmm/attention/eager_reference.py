"""The reference "flmm_capture" is checked against: HF's eager attention weights of the same model,
phrase rows x image columns, merged per phrase in plain Python; used by the tests and by the
self-check of a row that ``model.lmm.family=auto`` derived (:mod:`flmm.lmm.self_check`)."""

from __future__ import annotations

import torch

from flmm.attention.capture import use_capture


def eager_maps(lmm, inputs: dict, token_phrase: torch.Tensor, cols: torch.Tensor, num_phrases: int):
    """``B x K x L x H x P``: the mean eager attention of each phrase's rows over the image columns.

    The text decoder of ``lmm.model`` runs in eager attention for this one forward (then goes back
    to capture); each layer's ``B x H x N x N`` weights are reduced as soon as they exist, so one
    layer's weights at a time are held, not ``output_attentions``' whole stack.

    Args:
        inputs: the model inputs of ``FrozenLMM.encode`` (without ``token_phrase`` / ``region``).
        token_phrase: ``B x N`` phrase index of each token (-1 elsewhere).
        cols: ``B x P`` image-token positions (``FrozenLMM.image_columns``).
    """
    reduced: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(module, args, output):
            reduced[index] = per_phrase(output[1], token_phrase, cols, num_phrases)

        return hook

    hooks = [layer.self_attn.register_forward_hook(keep(i)) for i, layer in enumerate(lmm.layers)]
    lmm.model.set_attn_implementation({lmm.family.text_config: "eager"})
    try:
        with torch.no_grad():
            lmm.model(**inputs, logits_to_keep=1)
    finally:
        use_capture(lmm.model, lmm.family.text_config)
        for hook in hooks:
            hook.remove()
    return torch.stack([reduced[i] for i in sorted(reduced)], 2)


def per_phrase(weights: torch.Tensor, token_phrase, cols, num_phrases: int) -> torch.Tensor:
    """``B x H x N x N`` attention weights -> ``B x K x H x P`` (zeros for absent phrases)."""
    batch, heads = weights.shape[:2]
    out = torch.zeros(batch, num_phrases, heads, cols.shape[1])
    for b in range(batch):
        for k in range(num_phrases):
            rows = (token_phrase[b] == k).nonzero()[:, 0]
            if len(rows):
                out[b, k] = weights[b][:, rows][..., cols[b]].float().mean(1)
    return out
