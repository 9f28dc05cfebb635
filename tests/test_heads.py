"""Shapes and gradients of the mask head, the text prompts and the SAM refiner (tiny SAM)."""

import pytest
import torch

from flmm.heads import MaskHead, SamRefiner, TextPrompt, build_sam
from flmm.heads.sam_refiner import PAD_MASK_LOGIT, boxes_from_masks, mask_prompt


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


def test_mask_head_default_widths():
    head = MaskHead(16)
    widths = [block[0].out_channels for block in head.down]
    assert widths == [64, 128, 256, 512]
    assert all(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 1 for m in head.down[0][1::3])


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


def test_refiner_groups_phrases_exactly(refiner):
    torch.manual_seed(1)
    image = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8)
    embeddings, input_sizes = refiner.embed_images([image])
    coarse = torch.randn(3, 16, 16)
    text = [torch.randn(n, 64) for n in (3, 0, 3)]
    with torch.no_grad():
        (together,) = refiner(embeddings, [coarse], [text], input_sizes, [(40, 40)])
        alone = [
            refiner(embeddings, [coarse[k : k + 1]], [text[k : k + 1]], input_sizes, [(40, 40)])[0]
            for k in range(3)
        ]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-4)


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
                    boxes=boxes_from_masks(c > 0, input_sizes[b]),
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
