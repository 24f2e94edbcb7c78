"""Prefill time, memory (peak and resident) and disk size of a model variant."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import Unavailable


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict):
    """``out["peak_mem_gib"]``: ``torch.cuda.max_memory_allocated`` over the block (nothing on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30


def resident(device: torch.device) -> dict:
    """``resident_gib``: GPU memory allocated right now (the variant's weights, layouts and
    shared workspaces; the parked dense layers live on the CPU); empty on CPU."""
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize()
    return {"resident_gib": torch.cuda.memory_allocated() / 2**30}


def forward_last(model, ids, **kw):
    """Forward keeping only the last position's logits where the model allows it."""
    try:
        return model(ids, logits_to_keep=1, **kw)
    except TypeError:  # an older transformers without logits_to_keep
        return model(ids, **kw)


def measure_prefill(model, tokens: int, device, reps: int) -> dict:
    ids = torch.randint(model.config.vocab_size, (1, tokens), device=device)
    res = {}
    with peak_memory(device, res):
        sec = common.time_call(lambda: forward_last(model, ids, use_cache=False), device, reps)
    return dict(res, seconds=sec, tokens_per_s=tokens / sec)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_disk(model, variant: str, scratch: str | None) -> dict:
    if variant == "plain24":
        raise Unavailable("no plain 2:4 checkpoint format: cuSPARSELt buffers are built at load (see the weights row)")
    with tempfile.TemporaryDirectory(dir=scratch, prefix="armor-bench-") as tmp:
        out = Path(tmp) / "ckpt"
        if variant == "dense":
            try:
                model.save_pretrained(out)
            except ValueError as e:  # transformers refuses to re-save a GGUF-loaded model
                import safetensors.torch

                out.mkdir(parents=True)
                safetensors.torch.save_model(model, str(out / "model.safetensors"))
                model.config.to_json_file(out / "config.json")
                return {"disk_bytes": dir_bytes(out), "note": f"safetensors.save_model ({str(e)[:60]}...)"}
        else:
            try:
                from armor_runtime.checkpoint import save_pretrained
            except ImportError as e:
                raise Unavailable(f"armor_runtime.checkpoint is missing: {e}") from None
            save_pretrained(model, out)
        return {"disk_bytes": dir_bytes(out)}
