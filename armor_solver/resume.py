"""What lets a prune run resume: its files in ``OUT/.armor_partial/`` and its claim on OUT.

After each finished decoder block the run writes ``block_NNNN.safetensors`` (the block's
``ArmorWeights``) and then ``progress.json`` (the run's settings, the finished blocks, the
per-layer report), each atomically. A block counts as finished only once both exist.
Rerunning the same command resumes after the last finished block; a different run into
the same OUT is refused before any work (``same_run``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from armor_kernels import ArmorWeights

from . import outputs
from .models import model_sources

PARTIAL = ".armor_partial"
PROGRESS = "progress.json"
TENSORS = ("a", "values", "meta", "b", "bias")


class PipelineError(ValueError):
    """The run cannot start (or continue) as asked; nothing already written is touched."""


def read_progress(partial: str) -> dict | None:
    path = os.path.join(partial, PROGRESS)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_progress(partial: str, progress: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(progress, f, indent=1)

    outputs.write_file_atomically(os.path.join(partial, PROGRESS), write)


def remove_temp_files(partial: str) -> None:
    """``*.tmp`` files a dead run left in the partial folder (its last block or progress write)."""
    for name in os.listdir(partial):
        if name.endswith(".tmp"):
            os.remove(os.path.join(partial, name))


def _block_path(partial: str, index: int) -> str:
    return os.path.join(partial, f"block_{index:04d}.safetensors")


def save_block(partial: str, index: int, weights: dict[str, ArmorWeights], progress: dict) -> None:
    tensors = {f"{name}.{k}": t.contiguous().cpu() for name, w in weights.items() for k, t in w.tensors().items()}
    outputs.write_file_atomically(_block_path(partial, index), lambda tmp: save_file(tensors, tmp))
    write_progress(partial, progress)  # written last: the block counts only once both exist


def load_block(partial: str, index: int, names) -> dict[str, ArmorWeights]:
    tensors = load_file(_block_path(partial, index))
    out = {}
    for name in names:
        out[name] = ArmorWeights(**{k: tensors.get(f"{name}.{k}") for k in TENSORS})
        out[name].validate(name)
    return out


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
        progress = read_progress(os.path.join(path, PARTIAL))
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
