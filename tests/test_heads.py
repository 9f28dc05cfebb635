"""Shapes and gradients of the mask head, the text prompts and the SAM refiner (tiny SAM)."""

import pytest
import torch

from flmm.heads import MaskHead, SamRefiner, TextPrompt, build_sam
from flmm.heads.losses import bce_dice_loss
from flmm.heads.sam_refiner import PAD_MASK_LOGIT, boxes_from_masks, coarse_boxes, mask_prompt

# gIoU@0.5 of the toy task below: 0.49 measured (0.37-0.49 over seeds 0-2); the head with
# PyTorch's default conv init reached 0.001 at seed 0 (probabilities stuck under 0.5)
TOY_GIOU_FLOOR = 0.3


@pytest.fixture(scope="module")
def refiner():
    torch.manual_seed(0)
    return SamRefiner(build_sam("tiny"))


@pytest.mark.parametrize(
    ("channels", "h", "w", "expected"),
    [(4, 24, 24, (64, 64)), (3, 10, 7, (64, 45)), (8, 64, 64, (64, 64)), (2, 100, 70, (100, 70))],
)
def test_mask_head_shapes(channels, h, w, expected):
    head = MaskHead(channels, base_channels=8)
    out = head(torch.rand(5, channels, h, w))
    assert out.shape == (5, *expected)
    assert head.output_size(h, w) == expected


def test_mask_head_mirrors_the_reference_unet():
    """Widths, bias-free convs before GroupNorm(1), InterpConv and mmseg's state-dict keys."""
    head = MaskHead(16)
    widths = [stage[-1].convs[0].conv.out_channels for stage in head.encoder]
    assert widths == [64, 128, 256, 512]
    assert [type(stage[0]).__name__ for stage in head.encoder[1:]] == ["MaxPool2d"] * 3
    for module in head.modules():
        if hasattr(module, "gn"):
            assert module.conv.bias is None and module.gn.num_groups == 1
    keys = set(head.state_dict())
    assert {
        "encoder.0.0.convs.0.conv.weight",
        "encoder.0.0.convs.1.gn.bias",
        "encoder.3.1.convs.1.conv.weight",
        "decoder.0.upsample.interp_upsample.1.conv.weight",
        "decoder.2.upsample.interp_upsample.1.gn.weight",
        "decoder.2.conv_block.convs.1.conv.weight",
        "conv_seg.weight",
        "conv_seg.bias",
    } <= keys
    assert not any(k.endswith("conv.bias") for k in keys)
    assert head.decoder[0].conv_block.convs[0].conv.in_channels == 2 * 64


def test_mask_head_init_is_kaiming_fan_out_with_zero_bias():
    torch.manual_seed(0)
    head = MaskHead(64, base_channels=32)
    for module in head.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            if module.weight.numel() >= 4096:  # enough samples for a tight std estimate
                expected = (2.0 / fan_out) ** 0.5
                assert abs(module.weight.std().item() / expected - 1) < 0.1
            if module.bias is not None:
                assert torch.all(module.bias == 0)
        if isinstance(module, torch.nn.GroupNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    conv_seg = head.conv_seg.weight
    assert abs(conv_seg.std().item() / 2**0.5 - 1) < 0.3  # fan_out = 1: std sqrt(2)


def toy_attention(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n x 16 x 12 x 12`` attention-like maps: a blurred target box, a distractor and noise in
    every channel (each channel a different mix), and the ``n x 24 x 24`` target masks."""
    masks = torch.zeros(n, 2, 24, 24)
    for i in range(n):
        for j in range(2):
            y, x, h, w = torch.randint(0, 20, (4,), generator=generator).tolist()
            masks[i, j, y : y + 2 + h % 2, x : x + 2 + w % 2] = 1.0
    small = torch.nn.functional.avg_pool2d(masks, 2)
    blurred = torch.nn.functional.avg_pool2d(small, 3, stride=1, padding=1)
    weights = torch.rand(16, 2, generator=generator) * torch.tensor([1.0, 0.6])
    maps = torch.einsum("cj,njhw->nchw", weights, blurred)
    maps = maps + 0.2 * torch.rand(n, 16, 12, 12, generator=generator)
    return maps, masks[:, 0]


def test_mask_head_learns_a_toy_task_above_half_probability():
    """The reference init lets the head's probabilities cross 0.5 within a short training run
    (with PyTorch's default init it stayed below 0.5 everywhere: gIoU@0.5 = 0)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = MaskHead(16, base_channels=8, target_size=24)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(120):
        maps, target = toy_attention(32, generator)
        bce, dice = bce_dice_loss(head(maps), target)
        optimizer.zero_grad()
        (bce + dice).backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
    maps, target = toy_attention(128, generator)
    with torch.no_grad():
        pred = head.eval()(maps) > 0
    inter = (pred & (target > 0)).flatten(1).sum(1)
    union = (pred | (target > 0)).flatten(1).sum(1)
    giou = (inter / union.clamp(min=1)).mean().item()
    assert giou > TOY_GIOU_FLOOR, giou


def test_mask_head_normalises_each_channel():
    torch.manual_seed(0)
    head = MaskHead(3, base_channels=8).eval()
    maps = torch.rand(2, 3, 12, 12)
    scales = torch.tensor([5.0, 0.1, 30.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(head(maps), head(maps * scales), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(head(torch.zeros(1, 3, 12, 12))).all()


def test_text_prompt_mixes_layers():
    prompt = TextPrompt(hidden_size=6, num_layers=3, prompt_dim=4)
    hidden = torch.randn(2, 5, 3, 6)
    expected = prompt.proj(hidden.mean(dim=-2))
    torch.testing.assert_close(prompt(hidden), expected)
    torch.testing.assert_close(prompt(hidden.transpose(1, 2), layer_dim=1), expected)
    with pytest.raises(ValueError, match="expected 3 layers"):
        prompt(torch.randn(2, 3, 4, 6))


def test_refiner_freezes_image_encoder(refiner):
    refiner.train()
    assert not refiner.sam.image_encoder.training
    assert not any(p.requires_grad for p in refiner.sam.image_encoder.parameters())
    assert all(p.requires_grad for p in refiner.sam.mask_decoder.parameters())
    assert all(p.requires_grad for p in refiner.sam.prompt_encoder.parameters())


def test_embed_images_sizes(refiner):
    images = [torch.randint(0, 256, size, dtype=torch.uint8) for size in [(40, 60, 3), (90, 30, 3)]]
    embeddings, input_sizes = refiner.embed_images(images)
    assert embeddings.shape == (2, 64, 12, 12)
    assert input_sizes == [(64, 96), (96, 32)]
    assert not embeddings.requires_grad


def test_box_of_empty_mask_is_whole_frame():
    masks = torch.zeros(2, 8, 10, dtype=torch.bool)
    masks[1, 2:4, 5:10] = True
    boxes = boxes_from_masks(masks, (48, 60))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0, 60, 48], [30, 12, 60, 24]]))


def test_coarse_box_follows_the_upsampled_probabilities():
    """The box of a coarse blob: probabilities resized to the input frame, then > 0.5."""
    logits = torch.full((2, 6, 8), -10.0)
    logits[0, 2:4, 3:6] = 10.0
    boxes = coarse_boxes(logits, (48, 64))
    x0, y0, x1, y1 = boxes[0].tolist()
    assert 24 <= x0 <= 26 and 15 <= y0 <= 17 and 46 <= x1 <= 49 and 31 <= y1 <= 33
    assert boxes[1].tolist() == [0.0, 0.0, 64.0, 48.0]  # empty: the whole image


def test_mask_prompt_pads_outside_image(refiner):
    frame = mask_prompt(refiner.sam, torch.full((1, 5, 10), 3.0), (48, 96))
    assert frame.shape == (1, 1, 48, 48)
    torch.testing.assert_close(frame[0, 0, :24], torch.full((24, 48), 3.0))
    assert (frame[0, 0, 24:] == PAD_MASK_LOGIT).all()


def test_refiner_gradients_reach_head_and_text(refiner):
    torch.manual_seed(0)
    head = MaskHead(4, base_channels=8)
    image = torch.randint(0, 256, (30, 50, 3), dtype=torch.uint8)
    embeddings, input_sizes = refiner.embed_images([image])
    coarse = head(torch.rand(3, 4, 6, 10))
    text = [torch.randn(n, 64, requires_grad=True) for n in (2, 1, 2)]
    (refined,) = refiner(embeddings, [coarse], [text], input_sizes, [(30, 50)])
    assert refined.shape == (3, 30, 50)
    refined.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in text)
    assert refiner.sam.mask_decoder.output_upscaling[0].weight.grad is not None


# text lengths (3, 0, 3) group as phrases [0, 2], [1]: an order that is its own inverse; (1, 2, 3, 1)
# group as [0, 3], [1], [2]: order [0, 3, 1, 2], whose inverse [0, 2, 3, 1] differs
@pytest.mark.parametrize("lengths", [(3, 0, 3), (1, 2, 3, 1)])
def test_refiner_groups_phrases_exactly(refiner, lengths):
    torch.manual_seed(1)
    image = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8)
    embeddings, input_sizes = refiner.embed_images([image])
    coarse = torch.randn(len(lengths), 16, 16)
    text = [torch.randn(n, 64) for n in lengths]
    with torch.no_grad():
        (together,) = refiner(embeddings, [coarse], [text], input_sizes, [(40, 40)])
        alone = [
            refiner(embeddings, [coarse[k : k + 1]], [text[k : k + 1]], input_sizes, [(40, 40)])[0]
            for k in range(len(lengths))
        ]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-4)


def test_refiner_regroups_phrases_of_several_images(refiner):
    """Phrase counts (3, 1) with text lengths (1, 2, 3 | 1): grouped by length across images
    (order [0, 3, 1, 2], not its own inverse), each phrase comes back where it was, as it is
    refined alone."""
    torch.manual_seed(3)
    images = [torch.randint(0, 256, (40, 60, 3), dtype=torch.uint8) for _ in range(2)]
    embeddings, input_sizes = refiner.embed_images(images)
    coarse = [torch.randn(3, 8, 12), torch.randn(1, 8, 12)]
    text = [[torch.randn(n, 64) for n in (1, 2, 3)], [torch.randn(1, 64)]]
    sizes = [(40, 60)] * 2
    with torch.no_grad():
        together = refiner(embeddings, coarse, text, input_sizes, sizes)
        for b in range(2):
            for k in range(len(coarse[b])):
                (alone,) = refiner(
                    embeddings[b : b + 1],
                    [coarse[b][k : k + 1]],
                    [text[b][k : k + 1]],
                    input_sizes[b : b + 1],
                    sizes[b : b + 1],
                )
                torch.testing.assert_close(together[b][k : k + 1], alone, rtol=1e-4, atol=1e-4)


def test_refiner_batches_images_like_upstream_one_image_calls(refiner):
    """Folding image embeddings into dense prompts equals SAM's own per-image decoding."""
    torch.manual_seed(2)
    images = [
        torch.randint(0, 256, (40, 60, 3), dtype=torch.uint8),
        torch.randint(0, 256, (50, 30, 3), dtype=torch.uint8),
    ]
    embeddings, input_sizes = refiner.embed_images(images)
    coarse = [torch.randn(2, 8, 12), torch.randn(1, 10, 6)]
    text = [[torch.randn(2, 64), torch.randn(1, 64)], [torch.randn(2, 64)]]
    sam = refiner.sam
    with torch.no_grad():
        batched = refiner(embeddings, coarse, text, input_sizes, [(40, 60), (50, 30)])
        for b in range(2):
            for k in range(len(coarse[b])):
                c = coarse[b][k : k + 1]
                sparse, dense = sam.prompt_encoder(
                    points=None,
                    boxes=coarse_boxes(c, input_sizes[b]),
                    masks=mask_prompt(sam, c, input_sizes[b]),
                )
                sparse = torch.cat([sparse, text[b][k][None]], dim=1)
                low, _ = sam.mask_decoder(
                    embeddings[b : b + 1],
                    sam.prompt_encoder.get_dense_pe(),
                    sparse,
                    dense,
                    multimask_output=False,
                )
                expected = sam.postprocess_masks(low, input_sizes[b], images[b].shape[:2])[:, 0]
                torch.testing.assert_close(batched[b][k : k + 1], expected, rtol=1e-4, atol=1e-4)
