"""A device-resident batch loader: the split lives as one uint8 tensor on the training device and
each batch is augmented with whole-batch tensor ops (no per-image Python work in the step)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from trainables.augment import rand_augment, random_erasing
from trainables.data import AugmentConfig


def to_model_input(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (or NCHW float in 0..255) on any device -> normalised float NCHW."""
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float()
    return (images / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


class DeviceLoader:
    """Iterates (inputs, targets) batches of one split held on ``device``.

    Targets are int64 labels, or soft (B, C) targets when mixup/cutmix is on. Per-sample draws
    (order, shifts, flips) come from a generator on ``device``; per-batch scalars (mixup's lambda,
    the cutmix box) from one on the host, so no batch waits for the device. Both states are part of
    a training checkpoint (``rng_state``).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        *,
        batch_size: int,
        device: torch.device,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        num_classes: int,
        augment: AugmentConfig | None = None,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, device=self.device)
        self.std = torch.tensor(std, device=self.device)
        self.num_classes = num_classes
        self.augment = augment
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.host_generator = torch.Generator()
        self.host_generator.manual_seed(seed + 1)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = (
            torch.randperm(n, device=self.device, generator=self.generator)
            if self.shuffle
            else torch.arange(n, device=self.device)
        )
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx].permute(0, 3, 1, 2).float()
            y = self.labels[idx]
            aug = self.augment
            if aug is not None:
                x = self._augment_pixels(x)
            x = self._normalise(x)
            if aug is not None and aug.erasing > 0:
                x = self._erase(x)
            if aug is not None and aug.mixes:  # mixing is linear, so it commutes with the normalisation
                x, y = self._mix(x, y)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def rng_state(self) -> dict[str, torch.Tensor]:
        """Both generators' states, for a checkpoint."""
        return {"device": self.generator.get_state(), "host": self.host_generator.get_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """Restore ``rng_state()``; a bare tensor (older checkpoints) restores the device generator only."""
        if isinstance(state, torch.Tensor):
            self.generator.set_state(state)
            return
        self.generator.set_state(state["device"])
        self.host_generator.set_state(state["host"])

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, device=self.device, generator=self.generator)

    def _augment_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample geometry and RandAugment on pixel values 0..255."""
        aug = self.augment
        if aug.crop_scale is not None:
            x = self._random_resized_crop(x, aug.crop_scale)
        if aug.translate > 0:
            x = self._translate(x, aug.translate)
        if aug.flip:
            x = self._flip(x)
        if aug.rand_augment is not None:
            # RandAugment's ops act on uint8 values: a resized crop's interpolated pixels are rounded first
            x = rand_augment(x.round() if aug.crop_scale is not None else x, self.generator, aug.rand_augment)
        return x

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values 0..255 (NCHW float) -> the model's normalised input."""
        return to_model_input(x, self.mean, self.std)

    def _erase(self, x: torch.Tensor) -> torch.Tensor:
        """Random erasing of the normalised batch (one box per sample with probability ``erasing``)."""
        return random_erasing(x, self.generator, p=self.augment.erasing)

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        """Mirror each sample left-right with probability 0.5."""
        flip = self._rand(x.shape[0]) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)

    def _translate(self, x: torch.Tensor, pad: int) -> torch.Tensor:
        """Shift each sample by up to ``pad`` pixels each way, zero fill (a padded random crop)."""
        b, c, h, w = x.shape
        padded = F.pad(x, (pad, pad, pad, pad))
        shift = (self._rand(b, 2) * (2 * pad + 1)).long()
        rows = shift[:, 0:1] + torch.arange(h, device=x.device)
        cols = shift[:, 1:2] + torch.arange(w, device=x.device)
        # One gather along each sample's flattened padded planes: a plain copy, several times faster on
        # the CPU than the equivalent advanced indexing padded[batch, :, rows, cols].
        index = (rows.view(b, h, 1) * (w + 2 * pad) + cols.view(b, 1, w)).view(b, 1, h * w)
        return padded.flatten(2).gather(2, index.expand(b, c, h * w)).view(b, c, h, w)

    def _random_resized_crop(self, x: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
        b = x.shape[0]
        area = scale[0] + (scale[1] - scale[0]) * self._rand(b)
        log_ratio = (self._rand(b) * 2 - 1) * float(np.log(4 / 3))
        ratio = torch.exp(log_ratio)
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (self._rand(b) * 2 - 1) * (1 - sx)
        ty = (self._rand(b) * 2 - 1) * (1 - sy)
        theta = torch.zeros(b, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        aug = self.augment
        host = self.host_generator
        use_cutmix = aug.cutmix > 0 and (aug.mixup <= 0 or bool(torch.rand(1, generator=host) < 0.5))
        alpha = aug.cutmix if use_cutmix else aug.mixup
        beta_seed = int(torch.randint(2**31, (1,), generator=host))
        lam = float(np.random.default_rng(beta_seed).beta(alpha, alpha))
        perm = torch.randperm(x.shape[0], device=x.device, generator=self.generator)
        if use_cutmix:
            h, w = x.shape[2:]
            cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
            cy, cx = (torch.rand(2, generator=host) * torch.tensor([h, w])).long().tolist()
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            x = lam * x + (1 - lam) * x[perm]
        onehot = F.one_hot(y, self.num_classes).float()
        return x, lam * onehot + (1 - lam) * onehot[perm]
