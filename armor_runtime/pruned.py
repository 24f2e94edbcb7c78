"""From a finished prune run (``armor_solver.pipeline.PipelineResult``) to a model with ArmorLinear layers
and, when the run has an output directory, its checkpoint.

``armor_solver.pipeline.prune_model(..., finish=finisher(model, tokenizer))`` runs this while OUT is
still held by the run, so nothing can write OUT between the last block and the checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from armor_solver import calibration
from armor_solver.pipeline import PipelineError, PipelineResult
from armor_solver.resume import same_run

from .checkpoint import save_pretrained
from .convert import ConversionReport, convert_model


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


def cast_floating(model, dtype: torch.dtype) -> None:
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


def finish_prune(model, tokenizer, result: PipelineResult, max_shard_size=None) -> ConversionReport:
    """Swap the pruned linears of ``model`` for ArmorLinear (in the run's save dtype); with an output
    directory, save the checkpoint there."""
    targets = result.settings.targets or calibration.model_targets(model)
    if result.settings.dtype:
        cast_floating(model, getattr(torch, result.settings.dtype))
    report = convert_model(model, result.weights, targets=targets, ignore=result.settings.ignore)
    failed = {n: why for n, why in report.skipped.items() if n in result.weights}
    if failed:
        raise PipelineError(f"conversion failed for {len(failed)} layers (partial results kept): {failed}")
    if result.out_dir is not None:
        save_pretrained(model, result.out_dir, tokenizer=tokenizer, solver_settings=solver_record(result),
                        max_shard_size=max_shard_size, may_replace=same_run(asdict(result.settings)))
    return report


def finisher(model, tokenizer, reports: list | None = None, max_shard_size=None):
    """``finish`` for ``prune_model``: ``finish_prune`` on ``model``; its report is appended to ``reports``."""

    def finish(result: PipelineResult) -> None:
        report = finish_prune(model, tokenizer, result, max_shard_size)
        if reports is not None:
            reports.append(report)

    return finish
