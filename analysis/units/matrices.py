"""Unit performance matrices of every unit of a tap at once (docs/methods.md 2.3-2.4).

With ``r(x)`` the readout input (flattened or sequence-pooled tap features, as seen by the trained
readout) and ``W`` its bias-free weight (C, F), the field of unit ``u`` on output ``j`` is
``sum_{i in u} W[j, i] r_i(x)``. Its mean over test images of true label ``l`` is

    M_u[l, j] = sum_{i in u} W[j, i] * m[l, i],   m[l, i] = mean_{x in l} r_i(x),

so one pass of class-conditional means ``m`` and one product per unit kind give all matrices.
Units are contiguous groups of readout inputs:

- ``"filter"`` (conv taps): the H*W positions of one channel;
- ``"node"`` (token taps): one channel of the pooled vector;
- ``"head"`` (token taps with heads): the ``head_dim`` channels of one head.

The matrices of the units of one kind sum to the full readout's class-mean field ``m @ W.T``;
``kind_matrices`` checks this in float64, then rounds every matrix to float32: the values every
later step (clusters, statistics) uses and ``matrices.npz`` stores, so re-thresholding that file
reproduces the analysis bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .readout import Readout


@torch.no_grad()
def class_means(
    readout: Readout,
    x: Tensor,
    y: Tensor,
    num_labels: int,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Class-conditional means ``m`` (L, F) of the readout input, accumulated in float64.

    A label with no samples gets a row of zeros (so its row of every unit matrix is zero).
    """
    device = device or readout.fc.weight.device
    readout.eval()
    sums = torch.zeros(num_labels, readout.fc.in_features, dtype=torch.float64, device=device)
    counts = torch.zeros(num_labels, dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], batch_size):
        r = readout.readout_input(x[start : start + batch_size].to(device)).double()
        yb = y[start : start + batch_size].to(device).long()
        sums.index_add_(0, yb, r)
        counts.index_add_(0, yb, torch.ones_like(yb, dtype=torch.float64))
    return (sums / counts.clamp(min=1.0)[:, None]).cpu().numpy()


def unit_matrices(means: np.ndarray, weight: np.ndarray, group_size: int) -> np.ndarray:
    """Matrices (U, L, C) of the units made of ``group_size`` contiguous readout inputs.

    ``means`` is (L, F), ``weight`` is (C, F), ``F = U * group_size``.
    """
    L, F = means.shape
    C = weight.shape[0]
    if weight.shape[1] != F or F % group_size:
        raise ValueError(f"cannot split {F} inputs (weight {weight.shape}) into groups of {group_size}")
    U = F // group_size
    m = torch.from_numpy(np.ascontiguousarray(means, dtype=np.float64)).reshape(L, U, group_size)
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float64)).reshape(C, U, group_size)
    return torch.bmm(m.permute(1, 0, 2), w.permute(1, 2, 0)).numpy()  # one float64 GEMM per unit


def full_field(means: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Class-mean field (L, C) of the full readout: ``m @ W.T``."""
    return np.asarray(means, dtype=np.float64) @ np.asarray(weight, dtype=np.float64).T


def check_decomposition(matrices: np.ndarray, full: np.ndarray, rtol: float = 1e-6) -> float:
    """Raise if the unit matrices do not sum to the full field; return the relative error."""
    scale = max(float(np.abs(full).max()), 1e-300)
    err = float(np.abs(matrices.sum(axis=0) - full).max()) / scale
    if err > rtol:
        raise AssertionError(f"unit matrices do not sum to the full field (relative error {err:.3g})")
    return err


@dataclass
class TapMatrices:
    """Unit matrices of one tap by unit kind, plus the full field they sum to."""

    units: dict[str, np.ndarray]  # kind -> (U, L, C) float32
    full: np.ndarray  # (L, C)
    means: np.ndarray  # (L, F) class-conditional readout-input means


def unit_groups(kind: str, feature_shape: tuple[int, ...], head_dim: int | None = None) -> dict[str, int]:
    """Group size per unit kind for a tap: conv -> filter (H*W); token -> node (1) [+ head]."""
    if kind == "conv":
        _, h, w = feature_shape[-3:]
        return {"filter": h * w}
    if kind == "token":
        return {"node": 1, **({"head": head_dim} if head_dim else {})}
    raise ValueError(f"kind must be 'conv' or 'token', got {kind!r}")


def kind_matrices(
    means: np.ndarray,
    weight: np.ndarray,
    kind: str,
    feature_shape: tuple[int, ...],
    head_dim: int | None = None,
    rtol: float = 1e-6,
) -> dict[str, np.ndarray]:
    """Unit matrices (U, L, C) by unit kind, checked in float64 to sum to the full field, as float32."""
    full = full_field(means, weight)
    units = {}
    for name, group in unit_groups(kind, feature_shape, head_dim).items():
        m = unit_matrices(means, weight, group)
        check_decomposition(m, full, rtol)
        units[name] = m.astype(np.float32)
    return units


def tap_unit_matrices(
    readout: Readout,
    test_x: Tensor,
    test_y: Tensor,
    num_labels: int,
    head_dim: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    rtol: float = 1e-6,
) -> TapMatrices:
    """All unit matrices of a tap from its test features and trained readout (``kind_matrices``)."""
    means = class_means(readout, test_x, test_y, num_labels, batch_size, device)
    weight = readout.fc.weight.detach().double().cpu().numpy()
    units = kind_matrices(means, weight, readout.kind, tuple(test_x.shape), head_dim, rtol)
    return TapMatrices(units=units, full=full_field(means, weight), means=means)
