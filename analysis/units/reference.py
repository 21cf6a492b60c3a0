"""Brute-force reference for the unit matrices (tests only; slow but obviously right).

For each unit, copy the readout, zero every readout weight outside the unit (the sequence pooling
is left untouched), run the copy over every test sample through its ordinary forward, and average
the outputs per true label. Shares no code with ``units`` (only the ``Readout`` module itself).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor

from .readout import Readout


def _unit_masks(readout: Readout, unit: str, feature_shape: tuple[int, ...], head_dim: int | None) -> list[Tensor]:
    """One 0/1 mask per unit, shaped like the readout weight (C, F)."""
    C, F = readout.fc.weight.shape
    masks = []
    if unit == "filter":
        channels, h, w = feature_shape[-3:]
        for c in range(channels):
            m = torch.zeros(C, channels, h, w)
            m[:, c] = 1.0
            masks.append(m.reshape(C, F))
    elif unit == "node":
        for i in range(F):
            m = torch.zeros(C, F)
            m[:, i] = 1.0
            masks.append(m)
    elif unit == "head":
        for h in range(F // head_dim):
            m = torch.zeros(C, F)
            m[:, h * head_dim : (h + 1) * head_dim] = 1.0
            masks.append(m)
    else:
        raise ValueError(f"unknown unit kind {unit!r}")
    return masks


@torch.no_grad()
def reference_unit_matrices(
    readout: Readout,
    test_x: Tensor,
    test_y: Tensor,
    num_labels: int,
    unit: str,
    head_dim: int | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Unit matrices (U, L, C) by silencing all other units and running the readout forward."""
    results = []
    for mask in _unit_masks(readout, unit, tuple(test_x.shape), head_dim):
        silenced = copy.deepcopy(readout).eval()
        silenced.fc.weight.mul_(mask.to(silenced.fc.weight))
        outputs = torch.cat([silenced(test_x[s : s + batch_size]) for s in range(0, len(test_x), batch_size)])
        rows = []
        for label in range(num_labels):
            picked = outputs[test_y == label]
            rows.append(picked.mean(0) if len(picked) else torch.zeros(outputs.shape[1], dtype=outputs.dtype))
        results.append(torch.stack(rows).double().numpy())
    return np.stack(results)
