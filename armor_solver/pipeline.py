"""Prune a model block by block, resumably, and save an ARMOR checkpoint.

Order of work: validate everything that can be validated without computing
(method and its options, sequence length, targets, block sizes, finite
weights, output directory, corpus length), then walk the decoder blocks:
collect statistics, prune the block's target linears, cast the result to the
save dtype, and after each finished block atomically write it to
``OUT/.armor_partial/`` (safetensors + progress JSON with the run's settings).
Rerunning the same command resumes after the last finished block; a different
run into the same OUT is refused before any work. OUT is claimed through
``armor_solver.outputs`` (lock, recovery of a crashed save, refusals) for the
whole run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from armor_kernels import WRAPPER_BUDGET, ArmorWeights, block_pair, reference, sparse24
from armor_kernels.formats import ArmorFormatError

from . import calibration, data, outputs
from . import methods as registry
from .methods._plain24 import nowag_p_loss
from .methods.base import PruneConfig
from .methods.normalize import EPS
from .models import max_positions, model_sources

PARTIAL = ".armor_partial"
PROGRESS = "progress.json"
SAVE_DTYPES = ("float32", "bfloat16", "float16")


class PipelineError(ValueError):
    """The run cannot start (or continue) as asked; nothing already written is touched."""


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
    text: str = "wikipedia (bundled)"
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
class PipelineResult:
    weights: dict[str, ArmorWeights]
    layers: dict[str, dict]  # name -> shape, block sizes, losses, seconds
    settings: PruneSettings
    seconds: float
    out_dir: str | None = None
    conversion: object = None  # armor_runtime.convert.ConversionReport once converted
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


def _read_progress(partial: str) -> dict | None:
    path = os.path.join(partial, PROGRESS)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@dataclass
class OutDir:
    """What ``claim_out_dir`` found in OUT."""

    progress: dict | None = None  # an unfinished run with the same settings (None: a fresh start)
    finished: bool = False  # OUT holds the finished checkpoint of a run with the same settings
    recovered: list[str] = field(default_factory=list)  # what was done to a save a dead run left half done


def _recorded_settings(out_dir: Path) -> dict | None:
    """The run settings recorded in a finished checkpoint's config.json (None: not a checkpoint of ours)."""
    try:
        config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    record = dict(((config.get("quantization_config") or {}).get("solver")) or {})
    if "calibration_text" in record:
        record["text"] = record.pop("calibration_text")
    return record


def same_run(settings: dict, found: OutDir | None = None):
    """``may_replace`` for ``outputs.claim``: accept OUT holding an unfinished (or the finished) run of ``settings``."""
    found = found if found is not None else OutDir()

    def may_replace(path: Path) -> str | None:
        progress = _read_progress(os.path.join(path, PARTIAL))
        if progress is not None:
            if progress.get("settings") != settings:
                old = progress.get("settings") or {}
                diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
                raise PipelineError(
                    f"{path} holds an unfinished different run ({'; '.join(diff)}); "
                    "rerun with the same settings to resume, or choose another --out"
                )
            found.progress = progress
            return None
        record = _recorded_settings(path)
        if record is not None and all(record.get(k) == v for k, v in settings.items()):
            found.finished = True
            return None
        return "they are not an unfinished run of this command"

    return may_replace


@contextlib.contextmanager
def claim_out_dir(out_dir: str, settings: dict):
    """Hold OUT for the run (``outputs.claim``: lock, recovery, refusals) -> ``OutDir``."""
    found = OutDir()
    with outputs.claim(out_dir, sources=model_sources(settings.get("model", "")), may_replace=same_run(settings, found)) as c:
        found.recovered = c.recovered
        yield found


# ---- partial results ---------------------------------------------------------------
def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _remove_temp_files(partial: str) -> None:
    """``*.tmp`` files a dead run left in the partial folder (its last block or progress write)."""
    for name in os.listdir(partial):
        if name.endswith(".tmp"):
            os.remove(os.path.join(partial, name))


def save_block(partial: str, index: int, weights: dict[str, ArmorWeights], progress: dict) -> None:
    tensors = {f"{name}.{k}": t.contiguous().cpu() for name, w in weights.items() for k, t in w.tensors().items()}
    path = os.path.join(partial, f"block_{index:04d}.safetensors")
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    _atomic_json(os.path.join(partial, PROGRESS), progress)  # written last: the block counts only once both exist


def load_block(partial: str, index: int, names) -> dict[str, ArmorWeights]:
    tensors = load_file(os.path.join(partial, f"block_{index:04d}.safetensors"))
    out = {}
    for name in names:
        parts = {k: tensors.get(f"{name}.{k}") for k in ("a", "values", "meta", "b", "bias")}
        out[name] = ArmorWeights(**parts)
        out[name].validate(name)
    return out


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


def stored_loss(weight: torch.Tensor, packed: ArmorWeights, h: torch.Tensor) -> float:
    """``normalize.proxy_loss`` of the packed tensors as stored (after any cast) against ``weight``.

    Row chunk by row chunk (whole output blocks): the row norms are per row and the column norms are
    summed first, so no dense fp32 copy of the whole layer is made (a 14336x4096 layer would need 235 MB each).
    """
    d_out, d_in = weight.shape
    bo = packed.block_out
    rows = max(bo, (1 << 22) // d_in // bo * bo)
    chunks = [(r0, min(r0 + rows, d_out)) for r0 in range(0, d_out, rows)]
    h = h.to(weight.device, torch.float32)
    col = torch.zeros(d_in, device=weight.device)
    for r0, r1 in chunks:
        col += weight[r0:r1].float().square().sum(0)
    col = col.sqrt() + EPS
    num = den = 0.0
    for r0, r1 in chunks:
        w1 = weight[r0:r1].float() / col
        row = w1.norm(dim=1, keepdim=True) + EPS
        w_hat = reference.materialize(packed.a[r0 // bo:r1 // bo], packed.values[r0:r1], packed.meta[r0:r1], packed.b)
        w_bar = w1 / row
        num += float(((w_bar - w_hat.to(weight.device) / col / row).square() * h).sum())
        den += float((w_bar.square() * h).sum())
    return num / den


def wrapper_excess(d_out: int, d_in: int, block_out: int, block_in: int, elem: int) -> tuple[int, int]:
    """(wrapper bytes, 2:4 core bytes) of one layer stored with ``elem``-byte values."""
    wrappers = elem * (block_out * d_out + block_in * d_in)  # n blocks of b x b per side: b * d elements
    core = elem * d_out * (d_in // 2) + d_out * sparse24.meta_shape(d_out, d_in)[1]
    return wrappers, core


def _wrapper_warning(by_block, settings: PruneSettings, elem: int) -> str | None:
    """One line naming the layers whose wrappers would take more bytes than their 2:4 core (None: none do)."""
    block_sizes = getattr(registry.module(settings.method), "block_sizes", None)  # methods with wrappers publish it
    if block_sizes is None:
        return None
    big = []
    for linears in by_block.values():
        for name, m in linears.items():
            bo, bi = block_sizes(m.out_features, m.in_features, settings.block_size, settings.wrapper_budget)
            wrappers, core = wrapper_excess(m.out_features, m.in_features, bo, bi, elem)
            if wrappers > core:
                big.append(f"{name} [{m.out_features}x{m.in_features}] blocks {bo}/{bi}: wrappers {wrappers:,} B > core {core:,} B")
    if not big:
        return None
    return (f"{len(big)} layers get wrappers larger than their 2:4 core at --block-size {settings.block_size} "
            f"(a smaller --block-size shrinks them), e.g. {big[0]}")


def prune_model(
    model,
    tokenizer,
    settings: PruneSettings,
    out_dir: str | None = None,
    device: str = "cpu",
    corpus: data.Corpus | None = None,
    calib_ids: torch.Tensor | None = None,
    dense_stats: dict | None = None,
    on_block_done=None,
    log=None,
    save: bool = True,
) -> PipelineResult:
    """Prune ``model`` in place (its target linears become ArmorLinear when the runtime is present).

    ``calib_ids``/``dense_stats`` let a caller share calibration between runs of
    several methods; ``on_block_done(index)`` is called after each block is saved.
    With ``out_dir`` the directory is held (locked) for the whole run.
    """
    settings = settings.resolved()
    if out_dir is None:
        return _prune(model, tokenizer, settings, None, None, device, corpus, calib_ids, dense_stats, on_block_done, log, save)
    with claim_out_dir(out_dir, asdict(settings)) as found:
        if found.finished:
            raise PipelineError(f"{out_dir} already holds the finished checkpoint of this run; remove it to prune again")
        return _prune(model, tokenizer, settings, out_dir, found.progress, device, corpus, calib_ids, dense_stats,
                      on_block_done, log, save)


def _prune(model, tokenizer, settings, out_dir, progress, device, corpus, calib_ids, dense_stats, on_block_done, log, save):
    t0 = time.time()
    log = log or tqdm.write
    settings_dict = asdict(settings)
    prune_fn = registry.get(settings.method)
    full = registry.needs_xtx(settings.method, settings.extra)

    limit = max_positions(model)
    if limit is not None and settings.seqlen > limit:
        raise PipelineError(f"--seqlen {settings.seqlen} exceeds the model's max_position_embeddings = {limit}")
    try:
        by_block = calibration.find_targets(model, settings.targets, settings.ignore)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    check_block_sizes(by_block, settings.block_size, settings.wrapper_budget)
    check_finite_weights(by_block)
    save_dtype = getattr(torch, settings.dtype) if settings.dtype else None
    first = next(iter(next(iter(by_block.values())).values()))
    elem = torch.empty((), dtype=save_dtype or first.weight.dtype).element_size()
    warnings = [w for w in (_wrapper_warning(by_block, settings, elem),) if w]
    for w in warnings:
        log(f"warning: {w}")

    partial = os.path.join(out_dir, PARTIAL) if out_dir is not None else None
    done = set(progress["done_blocks"]) if progress else set()
    progress = progress or {"settings": settings_dict, "done_blocks": [], "layers": {}}

    names_needed = [n for linears in by_block.values() for n in linears]
    use_cached = (
        settings.propagation == "dense" and dense_stats is not None and all(n in dense_stats for n in names_needed)
    )
    runner = None
    if not use_cached:
        if calib_ids is None:
            corpus = corpus or data.load_corpus(None if settings.text == "wikipedia (bundled)" else settings.text)
            calib_ids = data.calibration_ids(tokenizer, corpus, settings.nsamples, settings.seqlen)
        if tuple(calib_ids.shape) != (settings.nsamples, settings.seqlen):
            raise PipelineError(f"calibration ids: shape {tuple(calib_ids.shape)}, settings ask for {settings.nsamples}x{settings.seqlen}")
        if partial:
            os.makedirs(partial, exist_ok=True)
        runner = calibration.LayerwiseRunner(model, calib_ids, device)
    elif partial:
        os.makedirs(partial, exist_ok=True)
    if partial:
        _remove_temp_files(partial)
        _atomic_json(os.path.join(partial, PROGRESS), progress)

    cfg = PruneConfig(block_size=settings.block_size, wrapper_budget=settings.wrapper_budget, iters=settings.iters,
                      device=device, extra=dict(settings.extra))
    weights: dict[str, ArmorWeights] = {}
    layers: dict[str, dict] = dict(progress["layers"])
    n_layers = len(names_needed)
    bar = tqdm(total=n_layers, desc=f"prune {settings.method}", unit="layer", dynamic_ncols=True)
    if done:
        log(f"resuming: blocks {sorted(done)} already finished in {partial}")
    last = max(by_block)
    for i in range(last + 1):
        linears = by_block.get(i, {})
        if i in done:
            finished = load_block(partial, i, linears)
            weights.update(finished)
            if settings.propagation == "sequential":
                for name, w in finished.items():
                    _apply(linears[name], w)
            if runner is not None and i < last:
                runner.run_block(i)  # recompute the inputs of the next block
            bar.update(len(linears))
            continue

        if use_cached:
            stats = {n: dense_stats[n] for n in linears}
        else:
            stats = calibration.new_stats(linears, full, device)
            # dense mode: one pass gives the statistics and the next block's (dense) inputs
            runner.run_block(i, stats, linears, advance=settings.propagation == "dense" and i < last)
        for name, s in stats.items():
            calibration.check_finite_stats(name, s)

        block_weights = {}
        for name, linear in linears.items():
            ts = time.time()
            w = linear.weight.detach().to(device)
            result = prune_fn(w, stats[name], cfg)
            packed = result.weights.to("cpu")
            if linear.bias is not None and packed.bias is None:
                packed = replace(packed, bias=linear.bias.detach().to("cpu", packed.dtype).contiguous())
            if save_dtype is not None and packed.dtype != save_dtype:
                packed = packed.to(dtype=save_dtype)  # computed in the model's dtype, stored in the save dtype
            packed.validate(name)
            seconds = time.time() - ts
            info = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool)) or v is None}
            init = info.get("init_loss")
            if init is None:
                init = nowag_p_loss(w, stats[name].cleaned_h())
            deployed = stored_loss(linear.weight.detach(), packed, stats[name].cleaned_h())  # the loss of what is saved
            wrappers, core = wrapper_excess(linear.out_features, linear.in_features, packed.block_out,
                                            packed.block_in, packed.values.element_size())
            info.update(
                shape=[linear.out_features, linear.in_features],
                block_out=packed.block_out,
                block_in=packed.block_in,
                nowag_p_loss=float(init),
                proxy_loss_deployed=deployed,
                dtype=str(packed.dtype).replace("torch.", ""),
                seconds=round(seconds, 3),
            )
            if wrappers > core:
                info["wrappers_exceed_core"] = {"wrapper_bytes": wrappers, "core_bytes": core}
            layers[name] = info
            block_weights[name] = packed
            bar.update(1)
            log(
                f"{name} [{linear.out_features}x{linear.in_features}] blocks {packed.block_out}/{packed.block_in} "
                f"loss nowag-p {init:.4f} -> {info['proxy_loss']:.4f}, stored {info['dtype']} {deployed:.4f} "
                f"({seconds:.1f}s)"
            )
        if settings.propagation == "sequential":
            for name, w in block_weights.items():
                _apply(linears[name], w)
            if runner is not None and i < last:
                runner.run_block(i)  # the pruned block's outputs enter the next block
        weights.update(block_weights)
        if partial:
            progress["done_blocks"] = sorted(done | {i})
            done.add(i)
            progress["layers"] = {n: layers[n] for n in layers if n in weights}
            save_block(partial, i, block_weights, progress)
        if on_block_done is not None:
            on_block_done(i)
    bar.close()

    result = PipelineResult(weights, {n: layers[n] for n in names_needed}, settings, time.time() - t0, out_dir,
                            warnings=warnings)
    if save:
        finish(model, tokenizer, result, partial)
    return result


def solver_record(result: PipelineResult) -> dict:
    """What the checkpoint records about how it was made."""
    s = asdict(result.settings)
    s["calibration_text"] = s.pop("text")
    s["per_layer"] = result.layers
    s["mean_proxy_loss"] = result.mean_loss()
    s["mean_proxy_loss_deployed"] = result.mean_loss("proxy_loss_deployed")
    s["warnings"] = list(result.warnings)
    s["seconds"] = round(result.seconds, 1)
    return s


def _cast_floating(model, dtype: torch.dtype) -> None:
    """Cast every floating parameter and persistent buffer to ``dtype`` (``convert_model`` then packs in it).

    Non-persistent buffers (rotary ``inv_freq``) keep their dtype, as ``from_pretrained`` leaves them.
    """
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # tied parameters are one object: cast once, still tied
        for key, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and key not in module._non_persistent_buffers_set:
                module._buffers[key] = b.to(dtype)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype


def finish(model, tokenizer, result: PipelineResult, partial: str | None) -> None:
    """Swap the pruned linears for ArmorLinear; with an output directory, save and drop the partial files."""
    from armor_runtime.convert import convert_model

    targets = result.settings.targets or calibration.model_targets(model)
    if result.settings.dtype:
        _cast_floating(model, getattr(torch, result.settings.dtype))
    report = convert_model(model, result.weights, targets=targets, ignore=result.settings.ignore)
    failed = {n: why for n, why in report.skipped.items() if n in result.weights}
    if failed:
        raise PipelineError(f"conversion failed for {len(failed)} layers (partial results kept): {failed}")
    result.conversion = report
    if result.out_dir is not None:
        from armor_runtime.checkpoint import save_pretrained

        save_pretrained(model, result.out_dir, tokenizer=tokenizer, solver_settings=solver_record(result),
                        may_replace=same_run(asdict(result.settings)))
        if partial and os.path.isdir(partial):
            shutil.rmtree(partial)
