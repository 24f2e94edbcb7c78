"""Prune a model block by block, resumably, and save an ARMOR checkpoint.

Order of work: validate everything that can be validated without computing
(method, sequence length, targets, block sizes, finite weights, output
directory, corpus length), then walk the decoder blocks: collect statistics,
prune the block's target linears, and after each finished block atomically
write its results to ``OUT/.armor_partial/`` (safetensors + progress JSON with
the run's settings). Rerunning the same command resumes after the last
finished block; a different run into the same OUT is refused before any work.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from armor_kernels import ArmorWeights, choose_block_size, reference
from armor_kernels.formats import ArmorFormatError

from . import calibration, data
from . import methods as registry
from .methods._plain24 import nowag_p_loss
from .methods.base import PruneConfig
from .models import max_positions

PARTIAL = ".armor_partial"
PROGRESS = "progress.json"


class PipelineError(ValueError):
    """The run cannot start (or continue) as asked; nothing already written is touched."""


@dataclass
class PruneSettings:
    """Everything that determines a run's result (recorded; a resume must match it exactly)."""

    model: str
    method: str
    nsamples: int = 128
    seqlen: int = 2048
    block_size: int = 128
    iters: int | None = None
    text: str = "wikipedia (bundled)"
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    propagation: str = ""  # "dense" or "sequential"; empty: the method's published mode

    def resolved(self) -> PruneSettings:
        prop = self.propagation or registry.propagation(self.method)
        if prop not in ("dense", "sequential"):
            raise PipelineError(f"propagation {prop!r}: choose 'dense' or 'sequential'")
        return replace(self, propagation=prop, ignore=list(self.ignore), targets=list(self.targets) if self.targets else None)


@dataclass
class PipelineResult:
    weights: dict[str, ArmorWeights]
    layers: dict[str, dict]  # name -> shape, block sizes, losses, seconds
    settings: PruneSettings
    seconds: float
    out_dir: str | None = None
    conversion: object = None  # armor_runtime.convert.ConversionReport once converted

    def mean_loss(self) -> float:
        losses = [v["proxy_loss"] for v in self.layers.values()]
        return sum(losses) / len(losses)


# ---- validation ------------------------------------------------------------------
def check_block_sizes(by_block, block_size: int) -> None:
    """Every target must have a valid block size on both sides, checked before any work."""
    for linears in by_block.values():
        for name, m in linears.items():
            try:
                if m.in_features % 4:
                    raise ArmorFormatError(f"d_in = {m.in_features} is not a multiple of 4 (2:4 groups)")
                choose_block_size(m.out_features, block_size)
                choose_block_size(m.in_features, block_size, 4)
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


def check_out_dir(out_dir: str, settings: dict) -> dict | None:
    """-> the progress of a matching unfinished run (None: fresh start). Refuses any other content."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return None
    progress = _read_progress(os.path.join(out_dir, PARTIAL))
    if progress is None:
        raise PipelineError(
            f"{out_dir} already holds files that are not an unfinished run of this command "
            f"({', '.join(sorted(os.listdir(out_dir))[:5])}); choose another --out or remove it"
        )
    if progress.get("settings") != settings:
        old = progress.get("settings") or {}
        diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
        raise PipelineError(
            f"{out_dir} holds an unfinished different run ({'; '.join(diff)}); "
            "rerun with the same settings to resume, or choose another --out"
        )
    return progress


# ---- partial results ---------------------------------------------------------------
def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


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
    """
    t0 = time.time()
    log = log or tqdm.write
    settings = settings.resolved()
    settings_dict = asdict(settings)
    prune_fn = registry.get(settings.method)
    full = registry.needs_xtx(settings.method)

    limit = max_positions(model)
    if limit is not None and settings.seqlen > limit:
        raise PipelineError(f"--seqlen {settings.seqlen} exceeds the model's max_position_embeddings = {limit}")
    if settings.block_size < 4:
        raise PipelineError(f"--block-size {settings.block_size}: must be at least 4 (input blocks hold whole 2:4 groups)")
    try:
        by_block = calibration.find_targets(model, settings.targets, settings.ignore)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    check_block_sizes(by_block, settings.block_size)
    check_finite_weights(by_block)

    partial = progress = None
    if out_dir is not None:
        progress = check_out_dir(out_dir, settings_dict)
        partial = os.path.join(out_dir, PARTIAL)
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
        _atomic_json(os.path.join(partial, PROGRESS), progress)

    cfg = PruneConfig(block_size=settings.block_size, iters=settings.iters, device=device, extra=dict(settings.extra))
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
            packed.validate(name)
            seconds = time.time() - ts
            info = {k: v for k, v in result.info.items() if isinstance(v, (int, float, str, bool)) or v is None}
            init = info.get("init_loss")
            if init is None:
                init = nowag_p_loss(w, stats[name].cleaned_h())
            info.update(
                shape=[linear.out_features, linear.in_features],
                block_out=packed.block_out,
                block_in=packed.block_in,
                nowag_p_loss=float(init),
                seconds=round(seconds, 3),
            )
            layers[name] = info
            block_weights[name] = packed
            bar.update(1)
            log(
                f"{name} [{linear.out_features}x{linear.in_features}] blocks {packed.block_out}/{packed.block_in} "
                f"loss nowag-p {init:.4f} -> {info['proxy_loss']:.4f} ({seconds:.1f}s)"
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

    result = PipelineResult(weights, {n: layers[n] for n in names_needed}, settings, time.time() - t0, out_dir)
    if save:
        finish(model, tokenizer, result, partial)
    return result


def solver_record(result: PipelineResult) -> dict:
    """What the checkpoint records about how it was made."""
    s = asdict(result.settings)
    s["calibration_text"] = s.pop("text")
    s["per_layer"] = result.layers
    s["mean_proxy_loss"] = result.mean_loss()
    s["seconds"] = round(result.seconds, 1)
    return s


def finish(model, tokenizer, result: PipelineResult, partial: str | None) -> None:
    """Swap the pruned linears for ArmorLinear; with an output directory, save and drop the partial files."""
    from armor_runtime.convert import convert_model

    targets = result.settings.targets or calibration.model_targets(model)
    report = convert_model(model, result.weights, targets=targets, ignore=result.settings.ignore)
    failed = {n: why for n, why in report.skipped.items() if n in result.weights}
    if failed:
        raise PipelineError(f"conversion failed for {len(failed)} layers (partial results kept): {failed}")
    result.conversion = report
    if result.out_dir is not None:
        from armor_runtime.checkpoint import save_pretrained

        save_pretrained(model, result.out_dir, tokenizer=tokenizer, solver_settings=solver_record(result))
        if partial and os.path.isdir(partial):
            shutil.rmtree(partial)
