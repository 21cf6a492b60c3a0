"""Whole-batch RandAugment and random erasing on any device, torch only.

RandAugment works on float (B, 3, H, W) batches holding integer values 0..255 (a uint8 image
converted to float) and reproduces, per sample, what torchvision's ``transforms.v2.functional`` ops
do to a uint8 image: after every op the values are clamped and truncated back to integers exactly as
torchvision's uint8 kernels do, so the result equals a uint8 pipeline. Each sample draws its own ops,
magnitudes and signs from a caller-owned ``torch.Generator`` (e.g. ``DeviceLoader.generator``), which
makes a batch reproducible from the generator state. There is no Python loop over samples: geometry
is one affine ``grid_sample`` per op slot for the whole batch, and each colour/histogram op is computed
for the whole batch with per-sample parameters and kept (``torch.where``) only where a sample drew it.
That costs some redundant arithmetic (every op on every sample, about 13 times the work) but never
syncs with the host, so it suits CUDA. On the CPU, where there is no sync to avoid and that arithmetic
is the whole cost, ``apply_rand_augment`` instead computes each op only on the samples that drew it;
the two paths give bit-identical outputs.

Random erasing works on the normalised batch (timm's ``RandomErasing`` semantics, one box per sample).

Magnitudes run from 0 to ``MAX_MAGNITUDE`` (10); each op's argument is linear in the magnitude:

    op               argument at magnitude m              at m = 10          sign
    ---------------  -----------------------------------  -----------------  ----
    ShearX, ShearY   tan(shear angle) = 0.3 m/10          0.3                 +/-
    TranslateX/Y     pixels = trunc(0.45 * size * m/10)   0.45 * W (or H)     +/-
                     (truncated toward zero, like torchvision's int(); size = W for X, H for Y)
    Rotate           degrees = 30 m/10, counter-clockwise 30                  +/-
    Brightness,      factor = 1 + sign * 0.9 m/10         0.1 or 1.9          +/-
    Color, Contrast,
    Sharpness
    Posterize        bits = 8 - round(4 m/10)             4 bits              none
                     (torch.round: halves go to the even integer)
    Solarize         threshold = 256 - 256 m/10           0 (all inverted)    none
                     (pixels >= threshold are inverted; m = 0 inverts nothing)
    Identity, AutoContrast, Equalize: no magnitude.

Geometric ops use nearest interpolation and fill 0 (torchvision RandAugment defaults). Shears are about
the top-left corner (torchvision ``_apply_op`` passes ``center=[0, 0]``), rotation is about the image
centre, translation is by whole pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from trainables.schema import Settings, setting

OPS: tuple[str, ...] = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)
GEOMETRIC_OPS: tuple[str, ...] = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
ENHANCE_OPS: tuple[str, ...] = ("Brightness", "Color", "Contrast", "Sharpness")
SIGNED_OPS: tuple[str, ...] = GEOMETRIC_OPS + ENHANCE_OPS
MAX_MAGNITUDE = 10.0

_SHEAR_MAX = 0.3
_TRANSLATE_MAX = 0.45
_ROTATE_MAX = 30.0
_ENHANCE_MAX = 0.9
_POSTERIZE_MAX_BITS_REMOVED = 4.0
_SOLARIZE_MAX = 256.0


@dataclass(frozen=True)
class RandAugmentConfig(Settings):
    """RandAugment settings (``data.augment.rand_augment``). The defaults are timm's
    "rand-m9-mstd0.5": two ops per sample at magnitude 9 with Gaussian magnitude noise of std 0.5
    (clipped to [0, 10])."""

    num_ops: int = setting(2, "ops per sample, drawn with replacement", low=1)
    magnitude: float = setting(9.0, "op strength on the 0..10 scale", low=0, high=MAX_MAGNITUDE)
    magnitude_std: float = setting(0.5, "std of the per-op Gaussian magnitude noise", low=0)
    op_prob: float = setting(1.0, "chance each drawn op is applied (torchvision 1.0, timm 0.5)", low=0, high=1)


@dataclass
class RandAugmentDraw:
    """The random choices for one batch, each (B, num_ops): op indices into ``OPS``, magnitudes on
    the 0..10 scale, and signs (+1/-1, ignored by unsigned ops). Ops skipped by ``op_prob`` are
    recorded as Identity."""

    ops: torch.Tensor
    magnitudes: torch.Tensor
    signs: torch.Tensor


def op_argument(op: str, magnitude: torch.Tensor, sign: torch.Tensor | None, height: int, width: int) -> torch.Tensor:
    """Per-sample op argument in torchvision's units (see the table above), as float64 (B,)."""
    m = magnitude.to(torch.float64) / MAX_MAGNITUDE
    s = torch.ones_like(m) if sign is None else sign.to(torch.float64)
    if op in ("ShearX", "ShearY"):
        return s * (_SHEAR_MAX * m)
    if op == "TranslateX":
        return s * torch.trunc(_TRANSLATE_MAX * width * m)
    if op == "TranslateY":
        return s * torch.trunc(_TRANSLATE_MAX * height * m)
    if op == "Rotate":
        return s * (_ROTATE_MAX * m)
    if op in ENHANCE_OPS:
        return 1.0 + s * (_ENHANCE_MAX * m)
    if op == "Posterize":
        return 8.0 - torch.round(_POSTERIZE_MAX_BITS_REMOVED * m)
    if op == "Solarize":
        return _SOLARIZE_MAX - _SOLARIZE_MAX * m
    if op in ("Identity", "AutoContrast", "Equalize"):
        return torch.zeros_like(m)
    raise ValueError(f"unknown op {op!r}; expected one of {OPS}")


# ----------------------------------------------------------------------------------------------
# Geometry: per-sample inverse affine maps, applied with one grid_sample.


def _inverse_affine(op: str, arg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 2, 3) float64 maps from output to input pixel coordinates, both measured from the image
    centre (torchvision's convention), for a geometric op with per-sample argument ``arg``."""
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if op == "ShearX":  # x_in = x_out + t * (y_out + H/2): sheared about the top-left corner
        rows = ((one, arg, arg * (height / 2)), (zero, one, zero))
    elif op == "ShearY":  # y_in = y_out + t * (x_out + W/2)
        rows = ((one, zero, zero), (arg, one, arg * (width / 2)))
    elif op == "TranslateX":
        rows = ((one, zero, -arg), (zero, one, zero))
    elif op == "TranslateY":
        rows = ((one, zero, zero), (zero, one, -arg))
    elif op == "Rotate":  # counter-clockwise by arg degrees about the centre (as F.rotate)
        rad = -torch.remainder(arg, 360.0) * (math.pi / 180.0)
        cos, sin = torch.cos(rad), torch.sin(rad)
        rows = ((cos, sin, zero), (-sin, cos, zero))
    else:
        raise ValueError(f"{op!r} is not a geometric op")
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=1)


def _warp(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Resample each sample of x at its inverse affine map (B, 2, 3): nearest, zero fill."""
    _, _, h, w = x.shape
    theta = inverse.to(torch.float32)
    # Normalise to grid_sample's [-1, 1] (align_corners=False) after applying theta, in float32.
    half = torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32, device=x.device)
    rescaled = theta.transpose(1, 2) / half  # (B, 3, 2)
    # Output pixel centres measured from the image centre. Elementwise rather than a matmul, so a
    # TF32 matmul setting cannot blur the coordinates (it matches torchvision's float32 bmm).
    # Built as (B, 2, H, W) and viewed as grid_sample's (B, H, W, 2): the same arithmetic as
    # broadcasting into (B, H, W, 2) directly, but with W innermost, which the CPU does ~10x faster.
    xs = (torch.arange(w, dtype=torch.float32, device=x.device) - (w - 1) / 2).view(1, 1, 1, w)
    ys = (torch.arange(h, dtype=torch.float32, device=x.device) - (h - 1) / 2).view(1, 1, h, 1)
    a, b, c = (rescaled[:, row].view(-1, 2, 1, 1) for row in range(3))
    grid = (xs * a + ys * b + c).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


# ----------------------------------------------------------------------------------------------
# Colour and histogram ops. Each takes x (B, 3, H, W) integer-valued float32 and a per-sample
# float64 argument (B,), and returns integer-valued float32 like torchvision's uint8 kernels.


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).view(-1, 1, 1, 1)


def _to_uint8_range(x: torch.Tensor) -> torch.Tensor:
    """Clamp to 0..255 and truncate, as torchvision's ``.clamp_(0, 255).to(uint8)``. Once clamped
    nothing is negative, so floor truncates (and is vectorised on CPU, where trunc is not)."""
    return x.clamp(0, 255).floor_()


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * x + (1 - ratio) * other, rounded as torchvision's fused ``mul(r).add_(o, alpha=1-r)``.

    torch's ``add(alpha=...)`` is a fused multiply-add; computing the sum in float64 from float32
    operands (the product is exact there) and rounding once to float32 reproduces it bit for bit.
    (``addcmul`` in float64 does that sum in one pass; fused or not, its exact product rounds alike.)"""
    scaled = x * _per_sample(ratio)
    alpha = _per_sample(1.0 - ratio).double()
    return torch.addcmul(scaled.double(), other.double(), alpha).float()


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) floored to integers, as torchvision's uint8 grayscale."""
    r, g, b = x.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _to_uint8_range(x * _per_sample(factor))


def _color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _to_uint8_range(_blend(x, _grayscale(x), factor))


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _to_uint8_range(_blend(x, mean, factor))


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend interior pixels with a rounded 3x3 smoothing (centre weight 5/13); borders kept.

    The smoothing is round(k / 13) with k the integer 3x3 sum plus 4 times the centre, summed exactly
    from shifted slices. k / 13 is never within 1/26 of a half, so this equals rounding torchvision's
    float32 convolution in any summation order; unlike a convolution it cannot be blurred by TF32 on
    a GPU, and on the CPU it is several times faster than a depthwise convolution."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    inner = x[..., 1:-1, 1:-1]
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    blurred = (box + 4.0 * inner).div_(13.0).round_()
    # inner + (1 - factor) * (blurred - inner), fused as in torchvision (see _blend).
    alpha = _per_sample(1.0 - factor).double()
    sharpened = torch.addcmul(inner.double(), (blurred - inner).double(), alpha).float()
    out = x.clone()
    out[..., 1:-1, 1:-1] = sharpened
    return _to_uint8_range(out)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` bits of each 8-bit value."""
    step = _per_sample(torch.pow(2.0, 8.0 - bits))
    return torch.floor(x / step) * step


def _solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= _per_sample(threshold), 255.0 - x, x)


def _autocontrast(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    """Stretch each channel's [min, max] to [0, 255]; constant channels are left as they are."""
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, torch.ones_like(low), (high - low).mul(1.0 / 255.0))
    low = torch.where(flat, torch.zeros_like(low), low)
    return _to_uint8_range((x - low) / inv_scale)


def _equalize(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel histogram equalisation with PIL's lookup table (as torchvision's uint8 kernel).

    lut[v] = (pixels below v + step // 2) // step with step = (pixels not at the channel's top
    value) // 255; channels with step 0 are left unchanged."""
    b, c, h, w = x.shape
    # Each pixel's index into one (b * c * 256) table of per-channel histograms and lookup tables,
    # offset while still float (exact below 2**24, float32's integer range) and converted once.
    exact = torch.float32 if b * c * 256 <= 2**24 else torch.float64
    offsets = torch.arange(0, b * c * 256, 256, dtype=exact, device=x.device).view(b, c, 1, 1)
    flat = (x + offsets).to(torch.long).reshape(-1)
    # scatter_add into a fixed-size histogram: bincount would read the input's max back to the host
    hist = torch.zeros(b * c * 256, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    hist = hist.view(b * c, 256)
    levels = torch.arange(256, device=x.device)
    top = torch.where(hist > 0, levels, 0).amax(dim=1, keepdim=True)
    step = (h * w - hist.gather(1, top)) // 255
    below = hist.cumsum(dim=1) - hist
    lut = ((below + step // 2) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, levels).to(x.dtype)  # channels with step 0: the identity
    return lut.view(-1).index_select(0, flat).view(b, c, h, w)


def _identity(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    return x


_PIXEL_OPS = {
    "Identity": _identity,
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
}


# ----------------------------------------------------------------------------------------------
# Public RandAugment API.


def apply_op(
    x: torch.Tensor, op: str, magnitude: torch.Tensor | float, sign: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Apply one named op to every sample of x (B, 3, H, W, values 0..255) with per-sample
    magnitudes (B,) on the 0..10 scale and signs (B,) of +1/-1 (default +1)."""
    b, _, h, w = x.shape
    magnitude = torch.as_tensor(magnitude, dtype=torch.float64, device=x.device).expand(b)
    if sign is not None:
        sign = torch.as_tensor(sign, dtype=torch.float64, device=x.device).expand(b)
    arg = op_argument(op, magnitude, sign, h, w)
    if op in GEOMETRIC_OPS:
        return _warp(x, _inverse_affine(op, arg, h, w))
    return _PIXEL_OPS[op](x, arg)


def draw_rand_augment(batch_size: int, config: RandAugmentConfig, generator: torch.Generator) -> RandAugmentDraw:
    """Draw each sample's ops (uniform over ``OPS``, with replacement), magnitudes and signs on
    the generator's device. Always consumes the same amount of randomness for a given batch size."""
    shape = (batch_size, config.num_ops)
    device = generator.device
    ops = torch.randint(len(OPS), shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    magnitudes = (config.magnitude + config.magnitude_std * noise).clamp(0.0, MAX_MAGNITUDE)
    signs = torch.where(torch.rand(shape, generator=generator, device=device) < 0.5, -1.0, 1.0)
    skipped = torch.rand(shape, generator=generator, device=device) >= config.op_prob
    ops = torch.where(skipped, OPS.index("Identity"), ops)
    return RandAugmentDraw(ops=ops, magnitudes=magnitudes, signs=signs)


def apply_rand_augment(x: torch.Tensor, draw: RandAugmentDraw, *, by_index: bool | None = None) -> torch.Tensor:
    """Apply a draw to x (B, 3, H, W, float, values 0..255): op slot by op slot, every sample its
    own op. Returns a new tensor with the same shape and dtype.

    ``by_index`` picks how a slot reaches each op's samples (both give identical outputs): True
    gathers them and computes each op only on its own samples, which reads the selection back to the
    host; False computes every op on the whole batch and keeps it where drawn, with no host sync but
    about ``len(OPS)`` times the arithmetic. Default: by index on the CPU (where there is no sync to
    avoid and the arithmetic is the cost), masked elsewhere."""
    _, _, h, w = x.shape
    if by_index is None:
        by_index = x.device.type == "cpu"
    apply_slot = _apply_slot_by_index if by_index else _apply_slot
    out = x.to(torch.float32)
    for slot in range(draw.ops.shape[1]):
        ops, magnitude, sign = draw.ops[:, slot], draw.magnitudes[:, slot], draw.signs[:, slot]
        out = apply_slot(out, ops, magnitude, sign, h, w)
    return out.to(x.dtype)


def _apply_slot(
    x: torch.Tensor, ops: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """One op per sample: one batched warp for the geometric ops, then each pixel op where drawn."""
    b = x.shape[0]
    inverse = torch.eye(2, 3, dtype=torch.float64, device=x.device).expand(b, 2, 3)
    geometric = torch.zeros(b, dtype=torch.bool, device=x.device)
    for op in GEOMETRIC_OPS:
        chosen = ops == OPS.index(op)
        arg = op_argument(op, magnitude, sign, h, w)
        inverse = torch.where(chosen.view(b, 1, 1), _inverse_affine(op, arg, h, w), inverse)
        geometric |= chosen
    # Samples without a geometric op keep their pixels exactly (the identity warp would too).
    out = torch.where(geometric.view(b, 1, 1, 1), _warp(x, inverse), x)
    for op, fn in _PIXEL_OPS.items():
        if op == "Identity":
            continue
        chosen = (ops == OPS.index(op)).view(b, 1, 1, 1)
        out = torch.where(chosen, fn(x, op_argument(op, magnitude, sign, h, w)), out)
    return out


def _apply_slot_by_index(
    x: torch.Tensor, ops: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """One op per sample: each op computed only on the samples that drew it (one host read)."""
    order = torch.argsort(ops, stable=True)
    counts = torch.bincount(ops, minlength=len(OPS)).tolist()
    out = x.clone()
    start = 0
    for op, count in zip(OPS, counts):
        idx, start = order[start : start + count], start + count
        if count == 0 or op == "Identity":
            continue
        arg = op_argument(op, magnitude[idx], sign[idx], h, w)
        if op in GEOMETRIC_OPS:
            done = _warp(x[idx], _inverse_affine(op, arg, h, w))
        else:
            done = _PIXEL_OPS[op](x[idx], arg)
        out[idx] = done
    return out


def rand_augment(
    x: torch.Tensor, generator: torch.Generator, config: RandAugmentConfig = RandAugmentConfig()
) -> torch.Tensor:
    """Per-sample RandAugment of x (B, 3, H, W, float, values 0..255) on the generator's device."""
    return apply_rand_augment(x, draw_rand_augment(x.shape[0], config, generator))


# ----------------------------------------------------------------------------------------------
# Random erasing.


@dataclass
class ErasingBoxes:
    """One box per sample, each (B,) long: top, left, height, width; ``erase`` (B,) bool says
    whether the sample is erased at all."""

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    erase: torch.Tensor

    def mask(self, h: int, w: int) -> torch.Tensor:
        """(B, 1, h, w) bool, true inside each erased sample's box."""
        rows = torch.arange(h, device=self.top.device).view(1, h, 1)
        cols = torch.arange(w, device=self.top.device).view(1, 1, w)
        top, left = self.top.view(-1, 1, 1), self.left.view(-1, 1, 1)
        in_rows = (rows >= top) & (rows < top + self.height.view(-1, 1, 1))
        in_cols = (cols >= left) & (cols < left + self.width.view(-1, 1, 1))
        return (in_rows & in_cols & self.erase.view(-1, 1, 1)).unsqueeze(1)


def draw_erasing_boxes(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator,
    p: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    attempts: int = 10,
) -> ErasingBoxes:
    """timm's box draw, batched: with probability p a sample gets a box of area fraction
    U(area) and aspect ratio (height / width) log-uniform in ``ratio``; sides are rounded
    (half to even). Like timm, up to ``attempts`` draws are made and the first whose sides are
    strictly smaller than the image's is used; a sample with no such draw is left unchanged.
    The box position is uniform over all placements inside the image."""
    device = generator.device
    shape = (batch_size, attempts)
    chosen = torch.rand(batch_size, generator=generator, device=device) < p
    target = area[0] + (area[1] - area[0]) * torch.rand(shape, generator=generator, device=device)
    target = target * (height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(shape, generator=generator, device=device))
    box_h = torch.round(torch.sqrt(target * aspect)).long()
    box_w = torch.round(torch.sqrt(target / aspect)).long()
    fits = (box_h < height) & (box_w < width)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting attempt
    box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
    place = torch.rand(batch_size, 2, generator=generator, device=device)
    top = (place[:, 0] * (height - box_h + 1)).long()
    left = (place[:, 1] * (width - box_w + 1)).long()
    return ErasingBoxes(top, left, box_h, box_w, chosen & fits.any(dim=1))


def random_erasing(
    x: torch.Tensor,
    generator: torch.Generator,
    p: float = 0.25,
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
    mode: Literal["pixel", "zero"] = "pixel",
    attempts: int = 10,
) -> torch.Tensor:
    """Erase one box per sample (with probability p) of a normalised batch x (B, C, H, W): filled
    with per-pixel, per-channel standard normal noise (timm's "pixel" mode) or zeros. Defaults are
    the CCT recipe (timm ``RandomErasing(0.25, mode="pixel")``)."""
    b, c, h, w = x.shape
    boxes = draw_erasing_boxes(b, h, w, generator, p, area, ratio, attempts)
    if mode == "pixel":
        fill = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif mode == "zero":
        fill = torch.zeros_like(x)
    else:
        raise ValueError(f"mode must be 'pixel' or 'zero', got {mode!r}")
    return torch.where(boxes.mask(h, w), fill, x)
