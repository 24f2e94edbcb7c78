"""ARMOR: prune one linear layer to ``W ≈ A · S · B`` (2:4 core S, block-diagonal A and B).

``prune(weight, stats, cfg) -> MethodResult``

1. Normalize ``W = diag(r) W̄ diag(c)`` (NoWag) and fit ``W̄`` under the proxy loss
   ``L = Σ h_j (W̄ − A S B)²_ij / Σ h_j W̄²_ij`` (``h`` = ``stats.cleaned_h()``).
2. Start from NoWag-P: ``A = B = I``, ``S = W̄ ⊙ M`` with ``M`` the top 2 of ``W̄² h``
   per group of 4. The returned loss is never above this starting loss.
3. Fit with one of three solvers (fp32, on ``cfg.device``):
   - ``"exact"`` (default, ``armor_exact``): closed-form updates of A and B, a CG
     solve of the kept values, and the 6-support group step, per sweep; monotone.
   - ``"adam"`` (``armor_adam``): the paper's schedule, one Adam step (lr 1e-4) and
     one sampled group per block pair per iteration, early stop, best state kept.
   - ``"fullcov"`` (``armor_fullcov``): the output error ``||(W − Ŵ)X||²`` under the full
     ``XᵀX`` (needs ``stats.xtx``), from SparseGPT's mask and values with ``A = B = I``;
     monotone, so each layer's error is never above SparseGPT's (checked; raises if not).
     Steps 1-2 above do not apply to it; ``proxy_loss`` still reports the diagonal proxy.
4. Fold ``diag(r)`` into A's rows and ``diag(c)`` into B's columns, cast to the
   weight's dtype and pack (``ArmorWeights.from_factors``) on the weight's device.

Options (``cfg.extra``, as set by the CLI):
- ``solver``: ``"exact"`` | ``"adam"`` | ``"fullcov"`` (``--solver``).
- ``sweeps``: exact or fullcov sweeps (``--sweeps``; default ``cfg.iters`` or 8). Stops
  early when a sweep gains less than a relative 1e-6.
- ``time_budget``: seconds per layer for either solver (``--time-budget``).
- ``cg_steps``: CG steps on the kept values per sweep (exact 3, fullcov 8).
- ``damp``: fullcov's damping of ``XᵀX`` (1 % of its mean diagonal, as SparseGPT).
- ``stop_below``: end the exact sweeps once the loss is at or below this (benchmarks).
- ``lr``, ``seed``: Adam learning rate (1e-4) and the group-sampling seed (0).
``cfg.iters``: Adam iterations (default 2000; the paper uses 20,000), or the
sweep count for the exact solver when ``sweeps`` is not given.
``cfg.block_size``: preferred block size per side; the largest divisor of the
dimension not above it is used (input side: also a multiple of 4), e.g. 576 -> 96.
``None``: the largest blocks (<= 128) whose wrappers stay within ``cfg.wrapper_budget``
of the layer (``armor_kernels.block_pair``; 576x576 at 6.25 %: 18/16).

``info``: ``proxy_loss`` (fp32 fit), ``proxy_loss_deployed`` (after the cast to the
weight's dtype), ``init_loss`` (NoWag-P), ``losses`` (after each sweep, or every
10th Adam iteration), ``trace`` (``(seconds, loss)`` pairs), ``iters``, ``seconds``,
``solver``, ``block_out``, ``block_in``; fullcov adds ``full_loss`` (its fit),
``full_loss_sparsegpt`` (its start), ``full_loss_deployed`` (after the cast) and ``damp``,
and has no ``init_loss`` (its start is SparseGPT, not NoWag-P).
"""

from __future__ import annotations

import time

import torch

from armor_kernels import WRAPPER_BUDGET, ArmorWeights, block_pair, reference, sparse24

from . import armor_adam, armor_exact, armor_fullcov, sparsegpt
from .armor_problem import Problem
from .base import MethodResult, Option, PruneConfig, check_options
from .normalize import normalize, stats_h
from .nowag_p import nowag_mask

SOLVERS = ("exact", "adam", "fullcov")
OPTIONS = {
    "solver": Option(str, "exact: closed-form sweeps; adam: the paper's schedule; fullcov: the full-covariance fit "
                     "from SparseGPT", default="exact", choices=SOLVERS),
    "sweeps": Option(int, "exact or fullcov sweeps (default: --iters, else 8)", minimum=0,
                     only_with=("solver", ("exact", "fullcov"))),
    "time_budget": Option(float, "seconds per layer, checked between sweeps or iterations", minimum=0),
    "cg_steps": Option(int, "CG steps on the kept values per sweep (exact: 3, fullcov: 8)", minimum=0,
                       only_with=("solver", ("exact", "fullcov"))),
    "damp": Option(float, "fullcov: fraction of the mean diagonal of XᵀX added to it (as SparseGPT)",
                   default=armor_fullcov.DAMP, minimum=0, only_with=("solver", "fullcov")),
    "stop_below": Option(float, "end the sweeps once the loss is at or below this", minimum=0,
                         only_with=("solver", "exact")),
    "lr": Option(float, "Adam learning rate", default=armor_adam.LR, minimum=0, only_with=("solver", "adam")),
    "seed": Option(int, "group-sampling seed", default=0, minimum=0, only_with=("solver", "adam")),
}


def needs_xtx(extra: dict) -> bool:
    """The full-covariance solver needs the full XᵀX; the others only its diagonal."""
    return extra.get("solver") == "fullcov"


def block_sizes(d_out: int, d_in: int, preferred: int | None, budget: float = WRAPPER_BUDGET) -> tuple[int, int]:
    """(output block, input block): ``armor_kernels.block_pair`` (``preferred`` None: the largest within ``budget``)."""
    return block_pair(d_out, d_in, preferred, budget)


def _option(extra: dict, key: str, default, kind):
    value = extra.get(key, default)
    if value is None:
        return None
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"cfg.extra[{key!r}]: expected {kind.__name__}, got {value!r}") from None
    if kind is not str and value < 0:
        raise ValueError(f"cfg.extra[{key!r}]: must be >= 0, got {value}")
    return value


def _pack(prob: Problem, a, s, mask, b, dtype) -> ArmorWeights:
    """``ArmorWeights.from_factors`` row chunk by row chunk (values and meta are per row)."""
    parts = [sparse24.compress(s[r0:r1].to(dtype), mask[r0:r1]) for r0, r1 in prob.chunks()]
    w = ArmorWeights(a=a.to(dtype).contiguous(), values=torch.cat([v for v, _ in parts]),
                     meta=torch.cat([m for _, m in parts]), b=b.to(dtype).contiguous(), bias=None)
    w.validate()
    return w


def _deployed_loss(prob: Problem, packed: ArmorWeights, r, c) -> float:
    """The proxy loss of the packed (cast) weights, ``normalize.proxy_loss`` per row chunk."""
    dev, bo = prob.w.device, prob.bo
    num = torch.empty(prob.w.shape[0], device=dev)
    for r0, r1 in prob.chunks():
        w_hat = reference.materialize(packed.a[r0 // bo:r1 // bo], packed.values[r0:r1], packed.meta[r0:r1], packed.b)
        w_hat_bar = w_hat.to(device=dev, dtype=torch.float32) / c / r[r0:r1, None]
        num[r0:r1] = ((prob.w[r0:r1] - w_hat_bar).square() * prob.h).sum(1)
    return float(num.sum()) / prob.denom


def _fit_diagonal(prob: Problem, solver: str, extra: dict, cfg: PruneConfig, time_budget):
    """The diagonal-proxy solvers from NoWag-P: (a, s, mask, b, loss, info); never above NoWag-P's loss."""
    mask = torch.cat([nowag_mask(prob.w[r0:r1], prob.h) for r0, r1 in prob.chunks()])  # row-wise: small temporaries
    s = prob.w * mask
    a, b = prob.identity_wrappers()
    init_loss = prob.loss(a, s, b)
    if solver == "exact":
        sweeps = _option(extra, "sweeps", cfg.iters if cfg.iters is not None else armor_exact.DEFAULT_SWEEPS, int)
        cg_steps = _option(extra, "cg_steps", armor_exact.CG_STEPS, int)
        stop_below = _option(extra, "stop_below", None, float)
        fit = armor_exact.fit_exact(prob, a, s, mask, b, sweeps, time_budget, cg_steps, stop_below=stop_below)
        losses = [l for _, l in fit.trace]
    else:
        n_iter = cfg.iters if cfg.iters is not None else armor_adam.DEFAULT_ITERS
        lr = _option(extra, "lr", armor_adam.LR, float)
        seed = _option(extra, "seed", 0, int)
        fit = armor_adam.fit_adam(prob, a, s, mask, b, n_iter, time_budget, lr, seed)
        losses = [l for _, l in fit.trace[::10]]
    a, s, mask, b, loss = fit.a, fit.s, fit.mask, fit.b, fit.loss
    if not loss <= init_loss:  # cannot happen (both solvers keep the best state); guards the theorem
        raise RuntimeError(f"ARMOR: fitted loss {loss} above the NoWag-P start {init_loss}")
    return a, s, mask, b, loss, {"init_loss": init_loss, "losses": losses, "trace": fit.trace, "iters": fit.iters}


def _fit_fullcov(weight, stats, w_bar, r, c, bo, bi, extra: dict, cfg: PruneConfig, time_budget):
    """The full-covariance fit from SparseGPT: (a, s, mask, b, info); never above SparseGPT's full loss."""
    if stats is None or getattr(stats, "xtx", None) is None:
        raise ValueError("armor --solver fullcov: needs the full XᵀX statistics (LayerStats with xtx)")
    damp = _option(extra, "damp", armor_fullcov.DAMP, float)
    sweeps = _option(extra, "sweeps", cfg.iters if cfg.iters is not None else armor_fullcov.DEFAULT_SWEEPS, int)
    cg_steps = _option(extra, "cg_steps", armor_fullcov.CG_STEPS, int)
    prob = armor_fullcov.FullProblem(w_bar, armor_fullcov.covariance(stats.xtx, c, damp), r.square(), bo, bi)
    w_sgpt, mask = sparsegpt.solve(weight, stats, damp)
    s = torch.where(mask, w_sgpt / r[:, None] / c, torch.zeros((), device=w_bar.device))
    del w_sgpt
    a = torch.eye(bo, device=w_bar.device).repeat(prob.no, 1, 1)
    b = torch.eye(bi, device=w_bar.device).repeat(prob.ni, 1, 1)
    init_loss = prob.loss(a, s, b)
    fit = armor_fullcov.fit_fullcov(prob, a, s, mask, b, sweeps, time_budget, cg_steps)
    if not fit.loss <= init_loss:  # cannot happen (every step is checked); guards the guarantee
        raise RuntimeError(f"ARMOR fullcov: fitted loss {fit.loss} above the SparseGPT start {init_loss}")
    info = {"full_loss": fit.loss, "full_loss_sparsegpt": init_loss, "damp": damp,
            "losses": [l for _, l in fit.trace], "trace": fit.trace, "iters": fit.iters}
    return fit.a, fit.s, fit.mask, fit.b, info


def prune(weight: torch.Tensor, stats, cfg: PruneConfig | None = None) -> MethodResult:
    cfg = cfg or PruneConfig()
    extra = dict(cfg.extra or {})
    check_options("armor", OPTIONS, extra)
    solver = _option(extra, "solver", "exact", str)
    if solver not in SOLVERS:
        raise ValueError(f"cfg.extra['solver']: expected one of {SOLVERS}, got {solver!r}")
    time_budget = _option(extra, "time_budget", None, float)
    h = stats_h(stats, weight)
    t0 = time.perf_counter()

    device = torch.device(cfg.device)
    w_bar, r, c = normalize(weight.to(device))
    h = h.to(device)
    bo, bi = block_sizes(*weight.shape, cfg.block_size, cfg.wrapper_budget)
    prob = Problem(w_bar, h, bo, bi)
    if solver == "fullcov":
        a, s, mask, b, info = _fit_fullcov(weight.to(device), stats, w_bar, r, c, bo, bi, extra, cfg, time_budget)
        loss = prob.loss(a, s, b)  # the diagonal proxy of the result, comparable with the other methods
    else:
        a, s, mask, b, loss, info = _fit_diagonal(prob, solver, extra, cfg, time_budget)

    # fold the normalization: W_hat = diag(r) A S B diag(c)
    a = a * r.reshape(prob.no, bo, 1)
    b = b * c.reshape(prob.ni, 1, bi)
    packed = _pack(prob, a, s, mask, b, weight.dtype).to(weight.device)
    del s, mask
    info.update({
        "proxy_loss": loss,
        "proxy_loss_deployed": _deployed_loss(prob, packed, r, c),
        "seconds": time.perf_counter() - t0,
        "solver": solver,
        "block_out": bo,
        "block_in": bi,
    })
    if solver == "fullcov":
        info["full_loss_deployed"] = armor_fullcov.deployed_loss(weight.to(device), packed, stats.xtx, info["damp"])
    return MethodResult(weights=packed, info=info)
