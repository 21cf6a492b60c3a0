"""Cluster-guided pruning masks (AFCC, ANDC, nodal) and their enforcement (docs/methods.md 5).

Masks are built in two steps:

1. A **connection mask** ``keep`` of shape (output units, input units) from per-unit label sets:
   ``connection_mask`` keeps ``(j, i)`` iff the label sets of input unit ``i`` and output unit
   ``j`` intersect (AFCC between conv layers, ANDC between FF layers, nodal between FC layers);
   ``output_mask`` keeps ``(j, i)`` iff output label ``j`` is in the set of input unit ``i``
   (last conv layer -> classifier).
2. ``expand`` turns it into a mask of the parameter's shape: a conv weight (O, I, kh, kw) gets the
   connection broadcast over its kernel; a linear weight (O, F) with F = U * g gets each input
   unit's ``g`` contiguous columns (g = H*W for a flattened conv map, 1 for nodes).

``plan_layers`` gives the parameters a method prunes and the taps whose label sets sit on each side,
as the model declares them (``TappedModel.prunable``).
Masks are enforced with ``torch.nn.utils.parametrize``: the effective weight is
``original * mask`` in every forward pass, so it holds through optimiser steps, and the state_dict
carries both the original and the mask (``rebuild_pruned`` restores the model exactly).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from trainables.models import build_model
from trainables.models.taps import Connection, TappedModel
from trainables.schema import InputError

LabelSets = dict[str, list[set[int]]]
Masks = dict[str, Tensor]


class PruneError(InputError):
    """Bad pruning input; the message starts with the offending parameter or field."""


# ---------------------------------------------------------------- rules on label sets


def check_fraction(name: str, value: float, high_open: bool) -> float:
    """``value`` as a float in [0, 1) (``high_open``) or [0, 1]; else PruneError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PruneError(f"{name}: must be a number, got {value!r}")
    if not (0 <= value < 1 if high_open else 0 <= value <= 1):
        raise PruneError(f"{name}: must be in [0, 1{')' if high_open else ']'}, got {value}")
    return float(value)


def _incidence(sets: Sequence[set[int]], num_labels: int) -> Tensor:
    """(units, labels) float matrix with a one where the unit's set holds the label."""
    out = torch.zeros(len(sets), num_labels)
    for u, labels in enumerate(sets):
        out[u, sorted(labels)] = 1.0
    return out


def _num_labels(*groups: Sequence[set[int]]) -> int:
    return 1 + max((max(s) for g in groups for s in g if s), default=0)


def connection_mask(in_sets: Sequence[set[int]], out_sets: Sequence[set[int]]) -> Tensor:
    """(len(out_sets), len(in_sets)) bool: keep (j, i) iff in_sets[i] & out_sets[j] is not empty."""
    n = _num_labels(in_sets, out_sets)
    return (_incidence(out_sets, n) @ _incidence(in_sets, n).T) > 0


def output_mask(in_sets: Sequence[set[int]], num_outputs: int) -> Tensor:
    """(num_outputs, len(in_sets)) bool: keep (j, i) iff output label j is in in_sets[i]."""
    if _num_labels(in_sets) > num_outputs:
        raise PruneError(f"label sets: label {_num_labels(in_sets) - 1} >= {num_outputs} outputs")
    return _incidence(in_sets, num_outputs).T > 0


def expand(keep: Tensor, shape: Sequence[int], name: str) -> Tensor:
    """Connection mask (O, U) -> mask of parameter ``shape`` (see the module docstring)."""
    shape = tuple(shape)
    out_units, in_units = keep.shape
    if len(shape) == 4 and shape[:2] == (out_units, in_units):
        return keep[:, :, None, None].expand(shape).clone()
    if len(shape) == 2 and shape[0] == out_units and in_units and shape[1] % in_units == 0:
        return keep.repeat_interleave(shape[1] // in_units, dim=1)
    raise PruneError(f"{name}: {out_units} x {in_units} unit connections do not fit its shape {list(shape)}")


def random_like(keep: Tensor, generator: torch.Generator) -> Tensor:
    """A random bool mask of the same shape keeping exactly as many entries as ``keep``."""
    flat = torch.zeros(keep.numel(), dtype=torch.bool)
    flat[torch.randperm(keep.numel(), generator=generator)[: int(keep.sum())]] = True
    return flat.view(keep.shape)


def random_at_level(shape: Sequence[int], level: float, generator: torch.Generator) -> Tensor:
    """A random bool mask of ``shape`` with dilution ``level`` (rounded to whole entries)."""
    level = check_fraction("level", level, high_open=False)
    total = int(torch.Size(shape).numel())
    keep = torch.zeros(total, dtype=torch.bool)
    keep[: total - round(level * total)] = True
    return random_like(keep, generator).view(tuple(shape))


def random_label_sets(units: dict[str, int], num_labels: int, k: int = 5, seed: int = 0) -> LabelSets:
    """The authors' control: each of ``units[tap]`` units per tap gets ``k`` distinct random labels."""
    if not 1 <= k <= num_labels:
        raise PruneError(f"random_labels_k: must be in [1, {num_labels}], got {k}")
    gen = torch.Generator().manual_seed(seed)
    return {
        tap: [set(torch.randperm(num_labels, generator=gen)[:k].tolist()) for _ in range(n)] for tap, n in units.items()
    }


def dilution(mask: Tensor) -> float:
    """1 - kept / total."""
    return 1.0 - float(mask.sum()) / mask.numel()


# ---------------------------------------------------------------- which layers a method prunes


def plan_layers(model: TappedModel, method: str, start_tap: str | None = None) -> list[Connection]:
    """The layers a cluster-guided method prunes, in depth order, as the model declares them
    (``model.prunable``: afcc and nodal for VGG, andc for CCT).

    ``start_tap`` keeps only the layers whose input tap is that tap or a deeper one.
    """
    if method not in model.prunable:
        family = model.spec["family"]
        hint = f"use {' or '.join(map(repr, model.prunable))}" if model.prunable else "no method applies"
        raise PruneError(f"method: {method!r} does not apply to a {family} model ({hint})")
    layers = list(model.prunable[method])
    if start_tap is None:
        return layers
    order = list(model.taps)
    if start_tap not in order:
        raise PruneError(f"start_tap: unknown tap {start_tap!r} (known: {', '.join(order)})")
    kept = [l for l in layers if order.index(l.inputs) >= order.index(start_tap)]
    if not kept:
        raise PruneError(f"start_tap: no {method} layer reads tap {start_tap!r} or a deeper one")
    return kept


def family_method(model: TappedModel) -> str | None:
    """The family's own cluster-guided method (the plan its random controls copy by default)."""
    return next(iter(model.prunable), None)


def needed_taps(layers: Sequence[Connection]) -> list[str]:
    """Taps whose label sets the layers need, without repeats, in first-use order."""
    return list(dict.fromkeys(t for l in layers for t in (l.inputs, l.outputs) if t is not None))


def layer_connections(layers: Sequence[Connection], label_sets: LabelSets, num_classes: int) -> Masks:
    """Connection masks (O, U) per parameter path from the label sets of the layers' taps."""
    missing = [t for t in needed_taps(layers) if t not in label_sets]
    if missing:
        raise PruneError(f"label sets: missing taps {missing}")
    out = {}
    for l in layers:
        ins = label_sets[l.inputs]
        out[l.param] = (
            output_mask(ins, num_classes) if l.outputs is None else connection_mask(ins, label_sets[l.outputs])
        )
    return out


def random_connections(connections: Masks, seed: int = 0) -> Masks:
    """Random connection masks with the same per-layer dilution as ``connections`` (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return {p: random_like(k, gen) for p, k in connections.items()}


def connection_l1(weight: Tensor, shape: Sequence[int]) -> Tensor:
    """Each unit connection's L1 norm: the summed |w| of the parameter entries ``expand`` gives it (a
    conv kernel, a classifier's group of flattened columns, or one weight)."""
    out_units, in_units = shape
    w = weight.detach().abs().float().cpu()
    return w.sum(dim=(2, 3)) if w.ndim == 4 else w.reshape(out_units, in_units, -1).sum(-1)


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """A bool mask of ``scores``' shape keeping its ``k`` largest entries (ties: the earlier entry)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[torch.argsort(scores.flatten(), descending=True, stable=True)[:k]] = True
    return keep.view(scores.shape)


def magnitude_connections(model: nn.Module, connections: Masks, per_layer: bool = True) -> Masks:
    """Magnitude pruning at the dilution of ``connections``: keep the connections of largest L1 norm,
    as many per layer as ``connections`` keeps (``per_layer``), or, with one threshold across the
    layers on the mean |w| per entry (so a 3x3 kernel and a single weight compare), the best
    connections until they hold as many parameters as ``connections`` keeps in all."""
    params = dict(model.named_parameters())
    scores = {p: connection_l1(params[p], k.shape) for p, k in connections.items()}
    if per_layer:
        return {p: top_k_mask(scores[p], int(k.sum())) for p, k in connections.items()}
    entries = {p: params[p].numel() // s.numel() for p, s in scores.items()}  # parameters per connection
    per_entry = torch.cat([(s / entries[p]).flatten() for p, s in scores.items()])
    sizes = torch.cat([torch.full((s.numel(),), entries[p]) for p, s in scores.items()])
    budget = sum(int(k.sum()) * entries[p] for p, k in connections.items())
    order = torch.argsort(per_entry, descending=True, stable=True)
    flat = torch.zeros(per_entry.numel(), dtype=torch.bool)
    flat[order[torch.cumsum(sizes[order], 0) <= budget]] = True
    out, start = {}, 0
    for p, s in scores.items():
        out[p], start = flat[start : start + s.numel()].view(s.shape), start + s.numel()
    return out


def inner_taps(layers: Sequence[Connection]) -> dict[str, tuple[list[Connection], list[Connection]]]:
    """Taps that a pruned layer writes and another reads: {tap: (its producers, its consumers)}. Their
    units can be removed whole (a filter or a node with its incoming and outgoing weights)."""
    out = {}
    for tap in needed_taps(layers):
        producers = [l for l in layers if l.outputs == tap]
        consumers = [l for l in layers if l.inputs == tap]
        if producers and consumers:
            out[tap] = (producers, consumers)
    return out


def emptied_units(layers: Sequence[Connection], masks: Masks) -> dict[str, Tensor]:
    """Per inner tap, a bool vector of the units the masks cut off: every weight into them or every
    weight out of them removed. ``masks`` may be connection masks (O, U) or full parameter masks."""
    out = {}
    for tap, (producers, consumers) in inner_taps(layers).items():
        units = masks[producers[0].param].shape[0]
        dead = torch.zeros(units, dtype=torch.bool)
        for l in producers:
            dead |= ~masks[l.param].reshape(units, -1).any(dim=1)
        for l in consumers:
            m = masks[l.param]
            dead |= ~m.reshape(m.shape[0], units, -1).any(dim=2).any(dim=0)
        out[tap] = dead
    return out


def structured_connections(model: nn.Module, layers: Sequence[Connection], connections: Masks) -> Masks:
    """The structured twin of ``connections`` (L1-norm unit pruning, Li et al. 2017): at each inner tap
    remove as many whole units as ``connections`` empties there, those whose incoming weights have the
    smallest L1 norm (ties: the earlier unit), with every weight into and out of them; keep the rest
    dense. Taps where nothing is emptied keep all their units."""
    params = dict(model.named_parameters())
    out = {p: torch.ones_like(k, dtype=torch.bool) for p, k in connections.items()}
    taps = inner_taps(layers)
    for tap, dead in emptied_units(layers, connections).items():
        producers, consumers = taps[tap]
        if not dead.any():
            continue
        norms = sum(connection_l1(params[l.param], connections[l.param].shape).sum(dim=1) for l in producers)
        removed = top_k_mask(-norms, int(dead.sum()))
        for l in producers:
            out[l.param][removed, :] = False
        for l in consumers:
            out[l.param][:, removed] = False
    return out


def full_masks(model: nn.Module, connections: Masks) -> Masks:
    """Expand connection masks to the shapes of the model's parameters."""
    params = dict(model.named_parameters())
    for path in connections:
        if path not in params:
            raise PruneError(f"{path}: no such parameter in the model")
    return {p: expand(k, params[p].shape, p) for p, k in connections.items()}


# ---------------------------------------------------------------- enforcement


class WeightMask(nn.Module):
    """Parametrization: weight = original * mask (mask is a persistent bool buffer)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.bool())

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def _split(path: str) -> tuple[str, str]:
    module, _, name = path.rpartition(".")
    return module, name


def apply_masks(model: nn.Module, masks: Masks) -> nn.Module:
    """Register a ``WeightMask`` on every masked parameter (all checked before any change).

    Raises PruneError naming the parameter if it is unknown, already masked, or the mask's shape
    does not fit it.
    """
    params = dict(model.named_parameters())
    for path, mask in masks.items():
        if path not in params:
            raise PruneError(
                f"{path}: no such parameter in the model (already masked parameters "
                f"appear as ...parametrizations.<name>.original)"
            )
        if tuple(mask.shape) != tuple(params[path].shape):
            raise PruneError(
                f"{path}: mask shape {list(mask.shape)} does not fit parameter shape {list(params[path].shape)}"
            )
    for path, mask in masks.items():
        module_path, name = _split(path)
        module = model.get_submodule(module_path)
        parametrize.register_parametrization(module, name, WeightMask(mask.to(params[path].device)))
    return model


def model_masks(model: nn.Module) -> Masks:
    """The masks currently enforced on a model, by parameter path (bool, on the CPU)."""
    out = {}
    for module_path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, WeightMask):
                        out[f"{module_path}.{name}" if module_path else name] = p.mask.cpu()
    return out


def save_masks(path: str | Path, masks: Masks) -> None:
    """Write masks as a dict of bool CPU tensors."""
    torch.save({p: m.bool().cpu() for p, m in masks.items()}, path)


def load_masks(path: str | Path) -> Masks:
    """Read masks written by ``save_masks`` (``weights_only`` load)."""
    masks = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(masks, dict) or not all(isinstance(m, Tensor) and m.dtype == torch.bool for m in masks.values()):
        raise PruneError(f"masks file {path}: expected a dict of bool tensors")
    return masks


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict of ``model`` with every mask folded into its weight (masked entries 0): what
    ``build_model(spec)`` loads, so a pruned model rebuilds and serves like any other."""
    plain = copy.deepcopy(model)
    for path in model_masks(plain):
        module, name = _split(path)
        parametrize.remove_parametrizations(plain.get_submodule(module), name, leave_parametrized=True)
    return plain.state_dict()


def rebuild_pruned(spec: dict[str, Any], state_dict: dict[str, Tensor], masks: Masks) -> TappedModel:
    """Rebuild a pruned model, masks enforced, from its spec, its state_dict (plain, as prune jobs
    write it, or parametrized, as ``model.state_dict()`` of a masked model holds it) and its masks."""
    if any(".parametrizations." in key for key in state_dict):
        model = apply_masks(build_model(spec), masks)
        model.load_state_dict(state_dict)
    else:
        model = build_model(spec)
        model.load_state_dict(state_dict)
        apply_masks(model, masks)
    for path, mask in model_masks(model).items():
        if not torch.equal(mask, masks[path].bool()):
            raise PruneError(f"{path}: the state_dict's mask differs from the masks given")
    return model


def mask_stats(model: nn.Module, masks: Masks) -> dict[str, Any]:
    """Per-layer kept / total / dilution, and parameter counts of the whole model."""
    layers = {p: {"kept": int(m.sum()), "total": m.numel(), "dilution": dilution(m)} for p, m in masks.items()}
    total = sum(p.numel() for p in model.parameters())
    removed = sum(l["total"] - l["kept"] for l in layers.values())
    masked_total = sum(l["total"] for l in layers.values())
    return {
        "layers": layers,
        "params_total": total,
        "params_kept": total - removed,
        "dilution_pruned_layers": removed / masked_total if masked_total else 0.0,
    }
