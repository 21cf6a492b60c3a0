"""Inference on raw images as the datasets store them: uint8 (N, H, W, 3) in, softmax out."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from trainables.device import pick_device
from trainables.loader import to_model_input


def check_images(images: np.ndarray) -> np.ndarray:
    """``images`` as a uint8 (N, H, W, 3) array, or ValueError saying what it is instead."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def inference_device(name: str = "auto") -> torch.device:
    """The device to serve on (``device.pick_device``); a bad or unavailable name is a ValueError."""
    return pick_device(name, "device")


def image_probs(
    model: nn.Module, images: np.ndarray, mean: list[float], std: list[float], batch: int = 256
) -> torch.Tensor:
    """Softmax probabilities (N, classes, float32, on the CPU) of ``model`` in eval mode for uint8
    images, normalised as in training (``loader.to_model_input`` with the training ``mean`` and
    ``std``), in batches on the model's device."""
    images = check_images(images)
    device = next(model.parameters()).device
    mean_t, std_t = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = to_model_input(torch.from_numpy(images[start : start + batch]).to(device), mean_t, std_t)
            out.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)
