"""The readout's L2-penalised objective solved to its optimum with full-batch L-BFGS.

The authors' readout (docs/methods.md 2.2, recipe ``"paper"``) runs 200 epochs of SGD with weight decay
``lam``; the point it converges to minimises

    J(theta) = mean_n CE(readout_theta(z_n), y_n) + lam / 2 * ||theta||^2

over the readout's parameters ``theta`` (the bias-free weight ``W``, plus the pooling vector ``p``
for token taps). Here ``J`` is minimised directly on cached features:

- conv taps: ``J`` is strongly convex in ``W``; one L-BFGS run over ``W``, every evaluation a pass
  over all training features in chunks.
- token taps: ``J`` is convex in ``W`` for a fixed ``p`` but not in ``p``. We minimise the reduced
  objective ``F(p) = min_W J(p, W)`` (variable projection): for each ``p`` the pooled vectors
  ``r(p)`` (N, D) are computed once, the small convex problem in ``W`` is solved on them, and
  ``grad F(p) = dJ/dp`` at that ``W`` (the envelope theorem) takes one more pass over the tokens.
  ``F`` lives in only ``D`` dimensions, so L-BFGS needs few of the expensive token passes.

``readout`` is an ``analysis.units.readout.Readout`` (its ``fc``, ``pool`` and ``readout_input``). The readout works on features divided by a scalar ``s`` (``Readout.scale``); the penalty is then
``lam / s^2`` on the scaled parameters, which is the same objective in the raw ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class LbfgsReport:
    """How a solve ended: objective value, gradient norm and the evaluations it took."""

    objective: float
    grad_norm: float
    evaluations: int  # full passes over the training features (token taps: outer evaluations)
    inner_iterations: int = 0  # token taps: L-BFGS iterations of the W problems, summed


def _lbfgs(params: list[Tensor], closure, max_iter: int, tol: float) -> int:
    """Run torch's L-BFGS with strong Wolfe line search; returns the number of closure calls."""
    calls = 0

    def counted():
        nonlocal calls
        calls += 1
        return closure()

    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        max_eval=int(max_iter * 1.5),
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    opt.step(counted)
    return calls


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def fit_linear(r: Tensor, y: Tensor, weight: Tensor, lam: float, max_iter: int, tol: float) -> int:
    """Minimise ``mean CE(r @ W.T, y) + lam/2 ||W||^2`` over ``weight`` (in place) on in-memory ``r``."""

    def closure():
        weight.grad = None
        loss = nn.functional.cross_entropy(r @ weight.T, y) + 0.5 * lam * weight.square().sum()
        loss.backward()
        return loss

    return _lbfgs([weight], closure, max_iter, tol)


@torch.enable_grad()
def solve_conv(
    readout: nn.Module, x: Tensor, y: Tensor, lam: float, max_iter: int, tol: float, chunk: int = 2048
) -> LbfgsReport:
    """Fit a conv readout's ``W`` to the optimum of ``J`` on features ``x`` (N, C, H, W)."""
    weight = readout.fc.weight
    n, device = x.shape[0], weight.device

    def closure():
        weight.grad = None
        total = torch.zeros((), device=device)
        for part in _chunks(n, chunk):
            xb = x[part].to(device, torch.float32)
            loss = nn.functional.cross_entropy(readout(xb), y[part], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * lam * weight.square().sum()
        penalty.backward()
        return total + penalty.detach()

    calls = _lbfgs([weight], closure, max_iter, tol)
    final = float(closure())
    return LbfgsReport(objective=final, grad_norm=float(weight.grad.norm()), evaluations=calls + 1)


@torch.no_grad()
def _pooled(readout: nn.Module, x: Tensor, chunk: int) -> Tensor:
    device = readout.fc.weight.device
    return torch.cat([readout.readout_input(x[part].to(device, torch.float32)) for part in _chunks(x.shape[0], chunk)])


@torch.enable_grad()
def solve_token(
    readout: nn.Module,
    x: Tensor,
    y: Tensor,
    lam: float,
    max_iter: int,
    tol: float,
    inner_max_iter: int = 500,
    chunk: int = 512,
) -> LbfgsReport:
    """Fit a token readout's pooling vector and ``W`` to a stationary point of ``J`` (variable projection)."""
    pool, weight = readout.pool, readout.fc.weight
    n, device = x.shape[0], weight.device
    inner = 0

    def closure():
        nonlocal inner
        r = _pooled(readout, x, chunk)
        inner += fit_linear(r, y, weight, lam, inner_max_iter, tol * 0.1)
        r.requires_grad_(True)
        loss = nn.functional.cross_entropy(r @ weight.detach().T, y)
        (grad_r,) = torch.autograd.grad(loss, r)
        pool.grad = None
        for part in _chunks(n, chunk):  # dJ/dp through the pooling, chunk by chunk
            rb = readout.readout_input(x[part].to(device, torch.float32))
            rb.backward(grad_r[part])
        penalty = 0.5 * lam * (pool.square().sum() + weight.detach().square().sum())
        pool.grad += lam * pool.detach()
        return loss.detach() + penalty.detach()

    weight.requires_grad_(True)
    calls = _lbfgs([pool], closure, max_iter, tol)
    final = float(closure())
    return LbfgsReport(
        objective=final, grad_norm=float(pool.grad.norm()), evaluations=calls + 1, inner_iterations=inner
    )
