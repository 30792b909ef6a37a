"""Tests for convshard.augment: per-image draws from (seed, epoch, index) and the transforms they drive."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convshard.augment import AUGMENTS, JITTER, ROTATE_DEGREES, Draw, check, default_augment, finish
from convshard.errors import ConfigError


def _crops(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every shift and flip ``crop`` and ``flip`` may produce from one (C, H, W) image."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    crops = [padded[:, i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return crops + [c.flip(-1) for c in crops]


def test_crop_and_flip_give_a_shifted_window_of_each_image() -> None:
    image = torch.arange(2 * 8 * 12, dtype=torch.float32).view(2, 8, 12) + 1  # every value distinct, non-zero
    outs = [finish(image, Draw.of(0, 0, i), ("crop", "flip")) for i in range(64)]
    for out in outs:
        assert out.shape == image.shape and out.dtype == torch.float32 and out.is_contiguous()
        assert any(torch.equal(out, crop) for crop in _crops(image, pad=1))  # pad = ceil(8 / 8)
    assert any((out == 0).any() for out in outs), "no shift reached the padding"
    flipped = sum(any(torch.equal(out, c) for c in _crops(image, 1)[9:]) for out in outs)
    assert 10 < flipped < 54


def test_draws_are_a_pure_function_of_seed_epoch_and_index() -> None:
    image = torch.rand(3, 32, 32)
    transforms = ("crop", "flip", "rotate", "jitter")
    first = finish(image, Draw.of(1, 2, 5), transforms)
    assert torch.equal(first, finish(image.clone(), Draw.of(1, 2, 5), transforms))
    for other in (Draw.of(1, 2, 6), Draw.of(1, 3, 5), Draw.of(2, 2, 5)):
        assert not torch.equal(first, finish(image, other, transforms))


def test_crop_pads_an_eighth_of_the_side_with_black_before_normalising() -> None:
    image = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    mean, std = (0.1307,), (0.3081,)
    outs = torch.stack([finish(image, Draw.of(0, 0, i), ("crop",), mean=mean, std=std) for i in range(256)])
    black, white = -0.1307 / 0.3081, (1 - 0.1307) / 0.3081
    assert sorted(outs.unique().tolist()) == pytest.approx([black, white], abs=1e-5)
    border = (outs[:, 0] == outs.min()).all(dim=2).sum(dim=1)  # rows of padding per image
    assert border.max() == 4  # ceil(28 / 8)


def test_no_draw_leaves_the_image_and_normalises_it() -> None:
    image = torch.randint(0, 256, (3, 6, 5), dtype=torch.uint8)
    out = finish(image, None, AUGMENTS, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    expected = (image.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(3, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_only_the_transforms_asked_apply() -> None:
    image = torch.arange(2 * 8 * 12, dtype=torch.float32).view(2, 8, 12) + 1
    for i in range(32):
        draw = Draw.of(0, 0, i)
        crop, flip, both = (finish(image, draw, t) for t in (("crop",), ("flip",), ("crop", "flip")))
        assert any(torch.equal(crop, c) for c in _crops(image, pad=1)[:9])  # shifted, never flipped
        assert torch.equal(flip, image.flip(-1) if draw.flip else image)  # flipped or not, never moved
        assert torch.equal(both, crop.flip(-1) if draw.flip else crop)  # the same draws
        assert torch.equal(finish(image, draw, ()), image)


def test_defaults_suit_the_data_and_unknown_transforms_are_refused() -> None:
    assert default_augment("mnist") == ("crop", "rotate")  # a flipped digit is another shape
    assert default_augment("cifar10") == ("crop", "flip")
    assert default_augment("folder") == default_augment("pkg.mod:fn") == ("resized-crop", "flip")
    with pytest.raises(ConfigError, match="'shear'"):
        check(("crop", "shear"))
    check(AUGMENTS)


def test_rotate_turns_each_image_about_its_centre_within_the_range() -> None:
    image = torch.zeros(1, 29, 29)
    image[:, 14, :] = 1.0  # a horizontal bar through the centre
    outs = torch.stack([finish(image, Draw.of(3, 1, i), ("rotate",)) for i in range(64)])
    assert outs[:, 0, 14, 14].min() > 0.99  # the centre stays where it is
    left, right = outs[:, 0, :, 4].argmax(dim=1), outs[:, 0, :, 24].argmax(dim=1)  # the bar 10 pixels either side
    slope = (left - right).double() / 20  # tan of the angle (rows grow downwards)
    assert slope.abs().max() <= math.tan(math.radians(ROTATE_DEGREES)) + 0.1
    assert (slope > 0.05).any() and (slope < -0.05).any()  # both ways
    corners = outs[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    turned = slope.abs() >= 0.15  # over 5.7 degrees: every corner reads from past the edge
    assert turned.any() and torch.all(corners[turned] == 0.0)  # ... and is black


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 600), st.integers(1, 600), st.integers(0, 10**6))
def test_resized_crop_box_lies_in_the_image_at_a_drawn_scale_and_ratio(width: int, height: int, i: int) -> None:
    left, top, right, bottom = Draw.of(0, 0, i).box(width, height)
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    w, h = right - left, bottom - top
    if (w, h) != (width, height) and min(width, height) >= 50:  # a drawn box, not the fallback (whole image)
        assert 0.08 * width * height * 0.9 <= w * h <= width * height
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_jitter_scales_within_its_range_and_keeps_pixels_in_range() -> None:
    image = torch.rand(3, 16, 16)
    for i in range(32):
        draw = Draw.of(0, 0, i)
        assert all(1 - JITTER <= f <= 1 + JITTER for f in draw.jitter)
        out = finish(image, draw, ("jitter",))
        assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, image)
    grey = torch.full((1, 4, 4), 0.5)
    b, _, _ = Draw.of(0, 0, 0).jitter
    torch.testing.assert_close(finish(grey, Draw.of(0, 0, 0), ("jitter",)), (grey * b).clamp(0, 1))  # flat: brightness
