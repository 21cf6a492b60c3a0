"""Batched RandAugment and random erasing (trainables.augment) against torchvision, per sample."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from trainables.augment import (
    GEOMETRIC_OPS,
    OPS,
    RandAugmentConfig,
    RandAugmentDraw,
    apply_op,
    apply_rand_augment,
    draw_erasing_boxes,
    draw_rand_augment,
    op_argument,
    rand_augment,
    random_erasing,
)

H, W = 24, 32  # not square, so height/width mix-ups show
NEAREST = InterpolationMode.NEAREST
# Geometric ops: nearest-neighbour sampling can round a coordinate that lies on a pixel boundary
# either way when the grid differs in its last float bit (BLAS/libm builds), so allow up to 1 % of
# pixels per image to differ. (On this torch build they match exactly.) Colour and histogram ops
# reproduce torchvision's float32 arithmetic and must match exactly.
GEOMETRIC_MAX_DIFFERING = 0.01


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images() -> torch.Tensor:
    """12 uint8 images (3, H, W): 6 random and 6 structured (ramp, stripes, disc, grey, flat,
    low contrast) so that geometry, grayscale rounding and histogram edge cases all show."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, H, W), generator=gen, dtype=torch.uint8)
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    x[0] = (cols * 8).clamp(max=255).to(torch.uint8)
    x[1, 0] = (rows * 10).to(torch.uint8)
    x[1, 1] = ((rows + cols) % 2 * 255).to(torch.uint8)
    x[1, 2] = 128
    x[2] = (((cols - 16) ** 2 + (rows - 12) ** 2) < 80).to(torch.uint8) * 200 + 20
    x[3] = x[3, :1].expand(3, H, W)
    x[4] = 77
    x[5] = x[5] // 4 + 100
    return x


def _torchvision(image: torch.Tensor, op: str, arg: float) -> torch.Tensor:
    """torchvision's op on one uint8 image, called as torchvision's RandAugment ``_apply_op``."""
    if op == "Identity":
        return image
    if op in ("ShearX", "ShearY"):
        degrees = math.degrees(math.atan(arg))
        shear = [degrees, 0.0] if op == "ShearX" else [0.0, degrees]
        return TF.affine(
            image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=NEAREST, center=[0, 0]
        )
    if op in ("TranslateX", "TranslateY"):
        translate = [int(arg), 0] if op == "TranslateX" else [0, int(arg)]
        return TF.affine(image, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=NEAREST)
    if op == "Rotate":
        return TF.rotate(image, arg, interpolation=NEAREST)
    enhance = {
        "Brightness": TF.adjust_brightness,
        "Color": TF.adjust_saturation,
        "Contrast": TF.adjust_contrast,
        "Sharpness": TF.adjust_sharpness,
    }
    if op in enhance:
        return enhance[op](image, arg)
    if op == "Posterize":
        return TF.posterize(image, int(arg))
    if op == "Solarize":  # torchvision rejects thresholds above 255; 256 inverts nothing
        return TF.solarize(image, arg) if arg <= 255 else image
    if op == "AutoContrast":
        return TF.autocontrast(image)
    if op == "Equalize":
        return TF.equalize(image)
    raise AssertionError(op)


def _magnitudes_and_signs(case: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample magnitudes: an even spread over 0..10, all 10, or random; signs alternate or random."""
    gen = torch.Generator().manual_seed(case)
    if case == 0:
        return torch.linspace(0, 10, n), torch.tensor([1.0, -1.0]).repeat(n // 2)
    if case == 1:
        return torch.full((n,), 10.0), torch.tensor([-1.0, 1.0]).repeat(n // 2)
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return torch.rand(n, generator=gen) * 10, signs


@pytest.mark.parametrize("op", OPS)
def test_op_matches_torchvision(op):
    images = _images()
    x = images.float()
    for case in range(4):
        magnitude, sign = _magnitudes_and_signs(case, len(x))
        out = apply_op(x, op, magnitude, sign)
        assert out.shape == x.shape and out.dtype == x.dtype
        args = op_argument(op, magnitude, sign, H, W)
        for i in range(len(x)):
            expected = _torchvision(images[i], op, float(args[i])).float()
            differs = (out[i] != expected).float()
            context = f"{op} case {case} image {i} arg {float(args[i])}"
            if op in GEOMETRIC_OPS:
                assert differs.mean() <= GEOMETRIC_MAX_DIFFERING, context
            else:
                assert differs.sum() == 0, context


def test_op_arguments_follow_the_table():
    m = torch.tensor([0.0, 5.0, 10.0])
    minus = torch.tensor([-1.0, -1.0, -1.0])
    assert op_argument("ShearX", m, minus, H, W).tolist() == pytest.approx([0.0, -0.15, -0.3])
    assert op_argument("TranslateX", m, None, H, W).tolist() == [0.0, 7.0, 14.0]  # trunc(0.45*32*m/10)
    assert op_argument("TranslateY", m, minus, H, W).tolist() == [0.0, -5.0, -10.0]
    assert op_argument("Rotate", m, None, H, W).tolist() == pytest.approx([0.0, 15.0, 30.0])
    assert op_argument("Contrast", m, minus, H, W).tolist() == pytest.approx([1.0, 0.55, 0.1])
    assert op_argument("Posterize", m, None, H, W).tolist() == [8.0, 6.0, 4.0]
    assert op_argument("Solarize", m, None, H, W).tolist() == pytest.approx([256.0, 128.0, 0.0])


def test_draw_spreads_ops_and_magnitudes():
    gen = torch.Generator().manual_seed(1)
    draw = draw_rand_augment(2800, RandAugmentConfig(), gen)
    assert draw.ops.shape == draw.magnitudes.shape == draw.signs.shape == (2800, 2)
    for slot in range(2):
        counts = torch.bincount(draw.ops[:, slot], minlength=len(OPS))
        assert counts.min() > 0.6 * 200 and counts.max() < 1.4 * 200  # 200 expected per op
    assert draw.magnitudes.min() >= 0 and draw.magnitudes.max() <= 10
    assert abs(draw.magnitudes.mean().item() - 8.9) < 0.1  # 9 +- 0.5 noise, clipped at 10
    assert abs((draw.signs > 0).float().mean().item() - 0.5) < 0.05
    skipping = draw_rand_augment(2000, RandAugmentConfig(op_prob=0.5), gen)
    identity = (skipping.ops == OPS.index("Identity")).float().mean().item()
    assert abs(identity - (0.5 + 0.5 / len(OPS))) < 0.05


def test_rand_augment_equals_ops_applied_one_by_one():
    """The batched slots give each sample exactly its own op sequence (checked per sample)."""
    x = _images().float().repeat(2, 1, 1, 1)
    draw = draw_rand_augment(len(x), RandAugmentConfig(num_ops=3), torch.Generator().manual_seed(2))
    out = apply_rand_augment(x, draw)
    for i in range(len(x)):
        expected = x[i : i + 1]
        for slot in range(3):
            op = OPS[int(draw.ops[i, slot])]
            expected = apply_op(expected, op, draw.magnitudes[i : i + 1, slot], draw.signs[i : i + 1, slot])
        assert torch.equal(out[i : i + 1], expected), (i, draw.ops[i].tolist())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_index_and_masked_dispatch_agree_bit_for_bit(layout):
    """The CPU default (each op on its own samples) and the CUDA default (every op on the whole
    batch, kept where drawn) give the same bits, whatever the input's memory layout."""
    x = _images().float().repeat(3, 1, 1, 1)
    draw = draw_rand_augment(len(x), RandAugmentConfig(num_ops=3), torch.Generator().manual_seed(9))
    by_index = apply_rand_augment(x.contiguous(memory_format=layout), draw, by_index=True)
    masked = apply_rand_augment(x, draw, by_index=False)
    assert torch.equal(by_index.view(torch.int32), masked.view(torch.int32))
    assert torch.equal(apply_rand_augment(x, draw), by_index)  # the CPU default


@pytest.mark.parametrize("op", OPS)
def test_op_ignores_memory_layout(op):
    x = _images().float()
    magnitude, sign = _magnitudes_and_signs(2, len(x))
    expected = apply_op(x, op, magnitude, sign)
    assert torch.equal(apply_op(x.contiguous(memory_format=torch.channels_last), op, magnitude, sign), expected)


def test_non_geometric_samples_keep_their_pixels():
    x = _images().float()
    n = len(x)
    ops = torch.tensor([OPS.index("Rotate"), OPS.index("Identity")]).repeat(n // 2).view(n, 1)
    draw = RandAugmentDraw(ops=ops, magnitudes=torch.full((n, 1), 7.0), signs=torch.ones(n, 1))
    out = apply_rand_augment(x, draw)
    assert torch.equal(out[1::2], x[1::2])
    assert not torch.equal(out[0::2], x[0::2])


def test_rand_augment_per_sample_and_reproducible():
    image = _images()[:1].float()
    x = image.expand(64, -1, -1, -1)
    first = rand_augment(x, torch.Generator().manual_seed(3))
    again = rand_augment(x, torch.Generator().manual_seed(3))
    other = rand_augment(x, torch.Generator().manual_seed(4))
    assert first.shape == x.shape and first.dtype == x.dtype
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(first, first.round()) and first.min() >= 0 and first.max() <= 255
    distinct = torch.unique(first.flatten(1), dim=0)
    assert len(distinct) > 40  # same image, own draws: outputs differ across samples
    unchanged = rand_augment(x, torch.Generator().manual_seed(3), RandAugmentConfig(op_prob=0.0))
    assert torch.equal(unchanged, x)


def _normalised(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 20, 24, generator=torch.Generator().manual_seed(seed))


def test_random_erasing_boxes_and_rate():
    x = _normalised(2000)
    h, w = x.shape[-2:]
    out = random_erasing(x, torch.Generator().manual_seed(6), p=0.25)
    boxes = draw_erasing_boxes(len(x), h, w, torch.Generator().manual_seed(6), p=0.25)
    mask = boxes.mask(h, w).expand_as(x)
    assert torch.equal(out[~mask], x[~mask])  # outside the boxes: untouched
    assert bool((out[mask] != x[mask]).all())  # inside: fresh noise
    changed = (out != x).flatten(1).any(dim=1)
    assert torch.equal(changed, boxes.erase)
    assert abs(changed.float().mean().item() - 0.25) < 0.04
    # Box sides are rounded from an area fraction in [0.02, 1/3] and aspect ratio in [0.3, 1/0.3].
    bh, bw = boxes.height[boxes.erase].double(), boxes.width[boxes.erase].double()
    assert bool(((bh - 0.5) * (bw - 0.5) <= h * w / 3).all())
    assert bool(((bh + 0.5) * (bw + 0.5) >= 0.02 * h * w).all())
    assert bool(((bh + 0.5) / (bw - 0.5) >= 0.3).all() and ((bh - 0.5) / (bw + 0.5) <= 1 / 0.3).all())
    top, left = boxes.top[boxes.erase], boxes.left[boxes.erase]
    assert bool((top >= 0).all() and (top + bh <= h).all() and (left >= 0).all() and (left + bw <= w).all())
    rectangles = torch.stack([top, left, bh.long(), bw.long()], dim=1)
    assert len(torch.unique(rectangles, dim=0)) > 0.8 * len(rectangles)  # each sample its own box


def test_random_erasing_zero_mode_and_reproducible():
    x = _normalised(200) + 10.0  # no zeros before erasing
    out = random_erasing(x, torch.Generator().manual_seed(7), p=0.5, mode="zero")
    erased = out == 0
    assert torch.equal(out[~erased], x[~erased])
    per_sample = erased.flatten(1).any(dim=1).float().mean().item()
    assert 0.3 < per_sample < 0.7
    again = random_erasing(x, torch.Generator().manual_seed(7), p=0.5, mode="zero")
    assert torch.equal(out, again)
    assert torch.equal(random_erasing(x, torch.Generator().manual_seed(7), p=0.0), x)
