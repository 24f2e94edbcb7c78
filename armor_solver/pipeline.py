"""Prune a model block by block, resumably: the solver's end is ``{name: ArmorWeights}`` plus resume files.

Order of work (``prune_model``): validate everything that can be validated without
computing (method and its options, sequence length, targets, block sizes, finite
weights, output directory, corpus length), then walk the decoder blocks: collect the
block's statistics, prune its target linears, cast the result to the save dtype, and
record it (``resume.save_block``). OUT is held through ``resume.claim_out_dir`` for
the whole run. Converting the model and writing the checkpoint is the runtime's job:
the caller passes it as ``finish``, which runs while OUT is still held, before the
resume files are dropped.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from tqdm.auto import tqdm

from armor_kernels import WRAPPER_BUDGET, ArmorWeights, block_pair, layer_bytes, reference
from armor_kernels.formats import ArmorFormatError

from . import calibration, data, resume
from . import methods as registry
from .methods.base import PruneConfig
from .methods.normalize import stored_proxy_loss
from .methods.nowag_p import nowag_p_loss
from .models import max_positions
from .resume import PARTIAL, PipelineError, claim_out_dir

__all__ = ["PARTIAL", "Calibration", "PipelineError", "PipelineResult", "PruneSettings", "claim_out_dir",
           "materialize_into", "prune_model"]
SAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PruneSettings:
    """Everything that determines a run's result (recorded; a resume must match it exactly)."""

    model: str
    method: str
    nsamples: int = 128
    seqlen: int = 2048
    block_size: int | None = 128  # None: per layer, the largest blocks within wrapper_budget (armor_kernels.block_pair)
    wrapper_budget: float = WRAPPER_BUDGET
    iters: int | None = None
    text: str = data.WIKIPEDIA
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    propagation: str = ""  # "dense" or "sequential"; empty: the method's published mode
    dtype: str = ""  # dtype the pruned layers (and the checkpoint) are stored in; empty: the model's

    def resolved(self) -> PruneSettings:
        """Validated copy, the method's defaults filled in. Everything here is checked before any work."""
        prop = self.propagation or registry.propagation(self.method)  # an unknown method raises here
        if prop not in ("dense", "sequential"):
            raise PipelineError(f"propagation {prop!r}: choose 'dense' or 'sequential'")
        sizes = (("nsamples", self.nsamples, 1), ("seqlen", self.seqlen, 2), ("block_size", self.block_size, 4))
        for name, value, least in sizes if self.block_size is not None else sizes[:2]:
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                why = " (input blocks hold whole 2:4 groups)" if name == "block_size" else ""
                raise PipelineError(f"--{name.replace('_', '-')} {value!r}: must be an integer of at least {least}{why}")
        if self.iters is not None and (isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0):
            raise PipelineError(f"--iters {self.iters!r}: must be an integer of at least 0")
        if isinstance(self.wrapper_budget, bool) or not isinstance(self.wrapper_budget, (int, float)) or not self.wrapper_budget > 0:
            raise PipelineError(f"--wrapper-budget {self.wrapper_budget!r}: must be a number above 0 (a share of each layer)")
        if self.dtype and self.dtype not in SAVE_DTYPES:
            raise PipelineError(f"--dtype {self.dtype!r}: choose one of {', '.join(SAVE_DTYPES)}")
        registry.check_options(self.method, self.extra, near=tuple(f.name for f in fields(PruneSettings)))
        return replace(self, propagation=prop, ignore=list(self.ignore), targets=list(self.targets) if self.targets else None)


@dataclass
class Calibration:
    """What the run calibrates on; anything left None is computed. Callers that prune several methods
    share ``ids`` (and, for dense propagation, ``dense_stats``) between the runs."""

    corpus: data.Corpus | None = None
    ids: torch.Tensor | None = None  # [nsamples, seqlen] token ids
    dense_stats: dict | None = None  # name -> LayerStats of the dense model


@dataclass
class PipelineResult:
    weights: dict[str, ArmorWeights]
    layers: dict[str, dict]  # name -> shape, block sizes, losses, seconds
    settings: PruneSettings
    seconds: float
    out_dir: str | None = None
    warnings: list[str] = field(default_factory=list)

    def mean_loss(self, key: str = "proxy_loss") -> float:
        """Mean over layers of ``key``: ``proxy_loss`` (the method's fit) or ``proxy_loss_deployed`` (as stored)."""
        losses = [v[key] for v in self.layers.values()]
        return sum(losses) / len(losses)


# ---- validation ------------------------------------------------------------------
def check_block_sizes(by_block, block_size: int | None, budget: float = WRAPPER_BUDGET) -> None:
    """Every target must have a valid block size on both sides, checked before any work."""
    for linears in by_block.values():
        for name, m in linears.items():
            try:
                if m.in_features % 4:
                    raise ArmorFormatError(f"d_in = {m.in_features} is not a multiple of 4 (2:4 groups)")
                block_pair(m.out_features, m.in_features, block_size, budget)
            except ArmorFormatError as e:
                raise PipelineError(f"{name} [{m.out_features}x{m.in_features}]: no valid block size: {e}") from None


def check_finite_weights(by_block) -> None:
    for linears in by_block.values():
        for name, m in linears.items():
            if not bool(torch.isfinite(m.weight).all()):
                raise PipelineError(f"{name}.weight contains NaN or Inf; the model is broken, nothing was pruned")


def _wrapper_warning(by_block, settings: PruneSettings, elem: int) -> str | None:
    """One line naming the layers whose wrappers would take more bytes than their 2:4 core (None: none do)."""
    block_sizes = getattr(registry.module(settings.method), "block_sizes", None)  # methods with wrappers publish it
    if block_sizes is None:
        return None
    big = []
    for linears in by_block.values():
        for name, m in linears.items():
            bo, bi = block_sizes(m.out_features, m.in_features, settings.block_size, settings.wrapper_budget)
            size = layer_bytes(m.out_features, m.in_features, bo, bi, elem)
            if size["armor_wrappers"] > size["armor_core"]:
                big.append(f"{name} [{m.out_features}x{m.in_features}] blocks {bo}/{bi}: "
                           f"wrappers {size['armor_wrappers']:,} B > core {size['armor_core']:,} B")
    if not big:
        return None
    return (f"{len(big)} layers get wrappers larger than their 2:4 core at --block-size {settings.block_size} "
            f"(a smaller --block-size shrinks them), e.g. {big[0]}")


# ---- the walk ----------------------------------------------------------------------
def _apply(linear, weights: ArmorWeights) -> None:
    """Write W_hat into the dense linear, so later blocks see the pruned outputs (sequential mode)."""
    w_hat = reference.materialize(weights.a, weights.values, weights.meta, weights.b)
    linear.weight.data.copy_(w_hat.to(linear.weight.device, linear.weight.dtype))


def materialize_into(model, weights: dict[str, ArmorWeights]) -> None:
    """Write every W_hat into the model's dense linears: the same function as the converted model,
    evaluated with dense kernels (quality measurements on CPU without the ArmorLinear path)."""
    for name, w in weights.items():
        _apply(model.get_submodule(name), w)


def prune_layer(prune_fn, name: str, linear, stats, cfg: PruneConfig, save_dtype) -> tuple[ArmorWeights, dict]:
    """Prune one linear -> (packed weights in the save dtype, the layer's report)."""
    ts = time.time()
    w = linear.weight.detach().to(cfg.device)
    result = prune_fn(w, stats, cfg)
    packed = result.weights.to("cpu")
    if linear.bias is not None and packed.bias is None:
        packed = replace(packed, bias=linear.bias.detach().to("cpu", packed.dtype).contiguous())
    if save_dtype is not None and packed.dtype != save_dtype:
        packed = packed.to(dtype=save_dtype)  # computed in the model's dtype, stored in the save dtype
    packed.validate(name)
    info = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool)) or v is None}
    init = info.get("init_loss")
    size = layer_bytes(*linear.weight.shape, packed.block_out, packed.block_in, packed.values.element_size())
    info.update(
        shape=[linear.out_features, linear.in_features], block_out=packed.block_out, block_in=packed.block_in,
        nowag_p_loss=float(init if init is not None else nowag_p_loss(w, stats.cleaned_h())),
        proxy_loss_deployed=stored_proxy_loss(linear.weight.detach(), packed, stats.cleaned_h()),  # what is saved
        dtype=str(packed.dtype).replace("torch.", ""), seconds=round(time.time() - ts, 3),
    )
    if size["armor_wrappers"] > size["armor_core"]:
        info["wrappers_exceed_core"] = {"wrapper_bytes": size["armor_wrappers"], "core_bytes": size["armor_core"]}
    return packed, info


class _Run:
    """One run's state while it walks the decoder blocks; each method is one named step."""

    def __init__(self, model, tokenizer, settings: PruneSettings, out_dir, progress, device, calib: Calibration, log):
        self.model, self.tokenizer, self.settings, self.out_dir = model, tokenizer, settings, out_dir
        self.device, self.calib, self.log = device, calib, log
        self.partial = os.path.join(out_dir, PARTIAL) if out_dir is not None else None
        self.done = set(progress["done_blocks"]) if progress else set()
        self.progress = progress or {"settings": asdict(settings), "done_blocks": [], "layers": {}}
        self.layers: dict[str, dict] = dict(self.progress["layers"])
        self.weights: dict[str, ArmorWeights] = {}
        self.warnings: list[str] = []
        self.runner = None

    def validate(self) -> None:
        """Everything checkable before any computation: sequence length, targets, block sizes, weights."""
        limit = max_positions(self.model)
        if limit is not None and self.settings.seqlen > limit:
            raise PipelineError(f"--seqlen {self.settings.seqlen} exceeds the model's max_position_embeddings = {limit}")
        try:
            self.by_block = calibration.find_targets(self.model, self.settings.targets, self.settings.ignore)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        check_block_sizes(self.by_block, self.settings.block_size, self.settings.wrapper_budget)
        check_finite_weights(self.by_block)
        self.names = [n for linears in self.by_block.values() for n in linears]
        self.save_dtype = getattr(torch, self.settings.dtype) if self.settings.dtype else None
        first = self.by_block[min(self.by_block)]
        elem = torch.empty((), dtype=self.save_dtype or next(iter(first.values())).weight.dtype).element_size()
        self.warnings = [w for w in (_wrapper_warning(self.by_block, self.settings, elem),) if w]
        for w in self.warnings:
            self.log(f"warning: {w}")

    def start(self) -> None:
        """Calibration inputs (unless every statistic is given) and the resume folder."""
        s, c = self.settings, self.calib
        self.cached = s.propagation == "dense" and c.dense_stats is not None and all(n in c.dense_stats for n in self.names)
        if not self.cached:
            ids = c.ids
            if ids is None:
                ids = data.calibration_ids(self.tokenizer, c.corpus or data.load_corpus(s.text), s.nsamples, s.seqlen)
            if tuple(ids.shape) != (s.nsamples, s.seqlen):
                raise PipelineError(f"calibration ids: shape {tuple(ids.shape)}, settings ask for {s.nsamples}x{s.seqlen}")
        if self.partial:
            os.makedirs(self.partial, exist_ok=True)
            resume.remove_temp_files(self.partial)
            resume.write_progress(self.partial, self.progress)
        if not self.cached:
            self.runner = calibration.LayerwiseRunner(self.model, ids, self.device)
        if self.done:
            self.log(f"resuming: blocks {sorted(self.done)} already finished in {self.partial}")

    def resume_block(self, i: int) -> None:
        """A block a previous run finished: load it, and move the calibration inputs past it."""
        finished = resume.load_block(self.partial, i, self.by_block.get(i, {}))
        self.weights.update(finished)
        self._propagate(i, finished)

    def block_stats(self, i: int) -> dict:
        linears = self.by_block.get(i, {})
        if self.cached:
            stats = {n: self.calib.dense_stats[n] for n in linears}
        else:
            stats = calibration.new_stats(linears, registry.needs_xtx(self.settings.method, self.settings.extra), self.device)
            # dense mode: one pass gives the statistics and the next block's (dense) inputs
            dense = self.settings.propagation == "dense" and i < self.last
            self.runner.run_block(i, stats, linears, advance=dense)
        for name, st in stats.items():
            calibration.check_finite_stats(name, st)
        return stats

    def prune_block(self, i: int, stats: dict, bar) -> dict[str, ArmorWeights]:
        s = self.settings
        cfg = PruneConfig(block_size=s.block_size, wrapper_budget=s.wrapper_budget, iters=s.iters, device=self.device,
                          extra=dict(s.extra))
        prune_fn = registry.get(s.method)
        block = {}
        for name, linear in self.by_block.get(i, {}).items():
            block[name], info = prune_layer(prune_fn, name, linear, stats[name], cfg, self.save_dtype)
            self.layers[name] = info
            bar.update(1)
            self.log(f"{name} [{linear.out_features}x{linear.in_features}] blocks {info['block_out']}/{info['block_in']} "
                     f"loss nowag-p {info['nowag_p_loss']:.4f} -> {info['proxy_loss']:.4f}, stored {info['dtype']} "
                     f"{info['proxy_loss_deployed']:.4f} ({info['seconds']:.1f}s)")
        self._propagate(i, block)
        return block

    def _propagate(self, i: int, block: dict[str, ArmorWeights]) -> None:
        """Sequential mode: the pruned block's outputs enter the next block."""
        if self.settings.propagation == "sequential":
            for name, w in block.items():
                _apply(self.by_block[i][name], w)
        advance = i in self.done or self.settings.propagation == "sequential"
        if self.runner is not None and advance and i < self.last:
            self.runner.run_block(i)

    def record(self, i: int, block: dict[str, ArmorWeights]) -> None:
        self.weights.update(block)
        if self.partial:
            self.done.add(i)
            self.progress["done_blocks"] = sorted(self.done)
            self.progress["layers"] = {n: self.layers[n] for n in self.layers if n in self.weights}
            resume.save_block(self.partial, i, block, self.progress)

    def walk(self, on_block_done) -> None:
        self.last = max(self.by_block)
        bar = tqdm(total=len(self.names), desc=f"prune {self.settings.method}", unit="layer", dynamic_ncols=True)
        for i in range(self.last + 1):  # blocks without targets too: the calibration inputs pass through them
            if i in self.done:
                self.resume_block(i)
                bar.update(len(self.by_block.get(i, {})))
                continue
            self.record(i, self.prune_block(i, self.block_stats(i), bar))
            if on_block_done is not None:
                on_block_done(i)
        bar.close()


def prune_model(
    model, tokenizer, settings: PruneSettings, out_dir: str | None = None, device: str = "cpu",
    calib: Calibration | None = None, log: Callable[[str], None] | None = None,
    on_block_done: Callable[[int], None] | None = None, finish: Callable[[PipelineResult], None] | None = None,
) -> PipelineResult:
    """Prune the target linears of ``model`` -> ``PipelineResult`` (the model's dense linears are kept,
    except that sequential propagation writes each pruned ``W_hat`` into them).

    With ``out_dir`` the run is resumable and OUT is held (locked) until it returns; ``finish(result)``
    (the runtime's convert-and-save) runs while it is held, after which the resume files are dropped.
    ``on_block_done(index)`` is called after each block is recorded.
    """
    settings = settings.resolved()
    calib, log = calib or Calibration(), log or tqdm.write
    if out_dir is None:
        return _prune(_Run(model, tokenizer, settings, None, None, device, calib, log), on_block_done, finish)
    with claim_out_dir(out_dir, asdict(settings)) as found:
        if found.finished:
            raise PipelineError(f"{out_dir} already holds the finished checkpoint of this run; remove it to prune again")
        return _prune(_Run(model, tokenizer, settings, out_dir, found.progress, device, calib, log), on_block_done, finish)


def _prune(run: _Run, on_block_done, finish) -> PipelineResult:
    t0 = time.time()
    run.validate()
    run.start()
    run.walk(on_block_done)
    result = PipelineResult(run.weights, {n: run.layers[n] for n in run.names}, run.settings, time.time() - t0,
                            run.out_dir, warnings=run.warnings)
    if finish is not None:
        finish(result)
        if run.partial and os.path.isdir(run.partial):
            shutil.rmtree(run.partial)
    return result
