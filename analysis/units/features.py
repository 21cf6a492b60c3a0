"""Tap features of a frozen model: one forward pass over the data serves all taps.

Uses the model interface of ``docs/design.md``: ``model(x, taps=[...])`` returns
``(logits, {name: tensor})`` with conv taps ``(B, C, H, W)`` and token taps ``(B, N, D)``.
The model must already receive normalised float NCHW input; pass ``transform`` to build it from
raw batches (e.g. ``lambda u8: to_model_input(u8.to(device), mean, std)`` for uint8 NHWC images).

Caches can be large (CIFAR-100 train at a 256x256 token tap: 50k x 256 x 256 values, 6.5 GB in
float16): choose ``dtype`` (float16 halves the memory; the readout casts each batch back to
float32) and set ``max_bytes`` to fail early with a clear message instead of running out of memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

Batch = Tensor | np.ndarray | tuple | list


def _batches(data: Tensor | np.ndarray | Iterable[Batch], batch_size: int) -> Iterable[Batch]:
    if isinstance(data, (Tensor, np.ndarray)):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size]
    else:
        yield from data


def _as_input(batch: Batch, transform: Callable | None, device: torch.device) -> Tensor:
    if isinstance(batch, (tuple, list)):  # (x, y, ...) batches: keep x
        batch = batch[0]
    if transform is not None:
        batch = transform(batch)
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    return batch.to(device, non_blocking=True)


@torch.no_grad()
def collect_features(
    model: nn.Module,
    data: Tensor | np.ndarray | Iterable[Batch],
    taps: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    transform: Callable[[Batch], Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    storage_device: str | torch.device = "cpu",
    max_bytes: int | None = None,
) -> dict[str, Tensor]:
    """Features of ``taps`` for all of ``data`` in one pass, in eval mode, in the input order.

    ``data``: a tensor / array of model inputs (split into ``batch_size`` batches) or an iterable of
    batches (tensors, arrays, or tuples whose first item is the input). Each batch goes through
    ``transform`` (if given) and to ``device``. Returns ``{tap: tensor}`` stored as ``dtype`` on
    ``storage_device``. Raises ``MemoryError`` if the cache would exceed ``max_bytes`` (checked
    after the first batch when the number of samples is known, and as it grows otherwise).
    """
    taps = list(taps)
    missing = [t for t in taps if t not in getattr(model, "taps", {})]
    if missing:
        raise KeyError(f"model has no taps {missing}; available: {list(getattr(model, 'taps', {}))}")
    device = torch.device(device)
    total = len(data) if isinstance(data, (Tensor, np.ndarray)) else None
    was_training = model.training
    model.eval()
    chunks: dict[str, list[Tensor]] = {t: [] for t in taps}
    out: dict[str, Tensor] = {}
    seen = 0
    try:
        for batch in _batches(data, batch_size):
            x = _as_input(batch, transform, device)
            _, feats = model(x, taps=taps)
            n = x.shape[0]
            if seen == 0 and max_bytes is not None:
                per_sample = sum(feats[t][0].numel() for t in taps) * torch.empty((), dtype=dtype).element_size()
                need = per_sample * (total if total is not None else n)
                if need > max_bytes:
                    raise MemoryError(
                        f"feature cache needs {need / 2**30:.2f} GiB for taps {taps}, "
                        f"limit {max_bytes / 2**30:.2f} GiB: use fewer taps, fewer samples "
                        f"or dtype=torch.float16"
                    )
            for t in taps:
                f = feats[t].to(storage_device, dtype)
                if total is not None:  # preallocate once the shapes are known
                    if t not in out:
                        out[t] = torch.empty((total, *f.shape[1:]), dtype=dtype, device=storage_device)
                    out[t][seen : seen + n] = f
                else:
                    chunks[t].append(f)
            seen += n
            if total is None and max_bytes is not None:
                used = sum(c.numel() * c.element_size() for t in taps for c in chunks[t])
                if used > max_bytes:
                    raise MemoryError(f"feature cache exceeded {max_bytes / 2**30:.2f} GiB after {seen} samples")
    finally:
        model.train(was_training)
    if total is None:
        out = {t: torch.cat(chunks[t]) for t in taps}
    elif seen != total:
        raise RuntimeError(f"expected {total} samples, got {seen}")
    return out
