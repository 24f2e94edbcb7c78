"""Shared benchmark plumbing: the shapes table, timing, device/version info, roofline, CSV rows.

Timing follows the house rule: ``triton.testing.do_bench`` medians (CUDA events)
on GPU with warm-up and autotuning done before the timed region;
``torch.utils.benchmark`` medians on CPU.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import inspect
import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# (model, layer(s), d_out, d_in) of the linear layers of each model. Layers with
# the same shape are merged ("q_proj/o_proj"): they time the same.
# Llama-2-7B: hidden 4096, MLP 11008, 32 heads, 32 KV heads, head dim 128.
# Llama-3-8B: hidden 4096, MLP 14336, 32 heads, 8 KV heads.
# Qwen2.5-7B: hidden 3584, MLP 18944, 28 heads, 4 KV heads.
# Qwen2.5-14B: hidden 5120, MLP 13824, 40 heads, 8 KV heads.
# SmolLM2-135M: hidden 576, MLP 1536, 9 heads, 3 KV heads, head dim 64.
# tiny: CPU smoke shapes only.
SHAPES: list[tuple[str, str, int, int]] = [
    ("llama2-7b", "q_proj/k_proj/v_proj/o_proj", 4096, 4096),
    ("llama2-7b", "gate_proj/up_proj", 11008, 4096),
    ("llama2-7b", "down_proj", 4096, 11008),
    ("llama3-8b", "q_proj/o_proj", 4096, 4096),
    ("llama3-8b", "k_proj/v_proj", 1024, 4096),
    ("llama3-8b", "gate_proj/up_proj", 14336, 4096),
    ("llama3-8b", "down_proj", 4096, 14336),
    ("qwen2.5-7b", "q_proj/o_proj", 3584, 3584),
    ("qwen2.5-7b", "k_proj/v_proj", 512, 3584),
    ("qwen2.5-7b", "gate_proj/up_proj", 18944, 3584),
    ("qwen2.5-7b", "down_proj", 3584, 18944),
    ("qwen2.5-14b", "q_proj/o_proj", 5120, 5120),
    ("qwen2.5-14b", "k_proj/v_proj", 1024, 5120),
    ("qwen2.5-14b", "gate_proj/up_proj", 13824, 5120),
    ("qwen2.5-14b", "down_proj", 5120, 13824),
    ("smollm2-135m", "q_proj/o_proj", 576, 576),
    ("smollm2-135m", "k_proj/v_proj", 192, 576),
    ("smollm2-135m", "gate_proj/up_proj", 1536, 576),
    ("smollm2-135m", "down_proj", 576, 1536),
    ("tiny", "up", 256, 128),
    ("tiny", "down", 128, 256),
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Unavailable(Exception):
    """This row cannot be measured here; the message is the reason (written as status ``unavailable``)."""


@contextlib.contextmanager
def environment(changes: dict[str, str | None]):
    """Set (or, for None, unset) these environment variables for the duration, and reset the
    dispatcher's choices on entry and exit (it reads ARMOR_* when a shape class is first seen)."""
    from armor_kernels import dispatch

    old = {k: os.environ.get(k) for k in changes}

    def put(values):
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        dispatch.reset()

    put(changes)
    try:
        yield
    finally:
        put(old)


def reason(e: Exception) -> str:
    """One line for a CSV's reason column: the message of an Unavailable, else the error's type and message."""
    text = str(e).splitlines()[0] if str(e) else ""
    return (text if isinstance(e, Unavailable) else f"{type(e).__name__}: {text}")[:300]


def select_shapes(spec: str) -> list[tuple[str, str, int, int]]:
    """``all`` (every real model), ``model``, ``model:layer`` (substring) or ``NxK``, comma-separated."""
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "all":
            out += [s for s in SHAPES if s[0] != "tiny"]
        elif "x" in item and item.replace("x", "").isdigit():
            n, k = (int(v) for v in item.split("x"))
            out.append(("custom", item, n, k))
        else:
            model, _, layer = item.partition(":")
            hits = [s for s in SHAPES if s[0] == model and layer in s[1]]
            if not hits:
                known = sorted({s[0] for s in SHAPES})
                raise ValueError(f"--shapes: {item!r} matches no shape (models: {known}; or NxK like 4096x4096)")
            out += hits
    seen, unique = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def parse_list(spec: str, cast=str) -> list:
    return [cast(s.strip()) for s in spec.split(",") if s.strip()]


def parse_dtypes(spec: str) -> list[str]:
    names = parse_list(spec)
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise ValueError(f"--dtypes: unknown {bad}; known: {sorted(DTYPES)}")
    return names


# ---- timing -----------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, smoke: bool = False, rep_ms: float = 100.0) -> tuple[float, str]:
    """Median milliseconds of ``fn()`` and the timer used. ``fn`` is called twice first
    (compilation, autotuning, lazy setup stay out of the timed region)."""
    fn()
    fn()
    sync(device)
    if device.type == "cuda":
        try:
            import triton.testing as tt
        except ImportError:
            return _cuda_events_median(fn, reps=20), "cuda events (no triton)"
        kwargs = {"warmup": max(rep_ms / 4, 5), "rep": rep_ms}
        if "return_mode" in inspect.signature(tt.do_bench).parameters:
            return float(tt.do_bench(fn, return_mode="median", **kwargs)), "triton.testing.do_bench"
        return float(tt.do_bench(fn, quantiles=[0.5], **kwargs)), "triton.testing.do_bench"
    import torch.utils.benchmark as tub

    timer = tub.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=0.02 if smoke else 0.5)
    return m.median * 1e3, "torch.utils.benchmark"


def _cuda_events_median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_call(fn, device: torch.device, reps: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``reps`` calls after one warm-up call
    (for whole-model runs, where each call is long)."""
    import time

    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---- roofline ---------------------------------------------------------------


@dataclass
class Roofline:
    """Measured ceilings: dense matmul TFLOP/s per dtype and copy GB/s."""

    tflops: dict[str, float]
    gbps: float
    how: str

    def ideal_ms(self, dtype: str, dense_flops: float, sparse_flops: float, nbytes: float) -> float:
        """Roofline time: dense flops at the measured matmul rate, 2:4 core flops at twice
        it (the datasheet ratio of sparse to dense tensor cores), bytes at the copy rate."""
        peak = self.tflops[dtype] * 1e12
        compute = dense_flops / peak + sparse_flops / (2 * peak)
        memory = nbytes / (self.gbps * 1e9)
        return max(compute, memory) * 1e3


def _copy_gbps(device: torch.device, n_bytes: int, smoke: bool) -> float:
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms, _ = bench(lambda: dst.copy_(src), device, smoke)
    return 2 * n_bytes / (ms * 1e-3) / 1e9  # read + write


def _matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, smoke: bool) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms, _ = bench(lambda: a @ b, device, smoke)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def measure_roofline(device: torch.device, dtypes: list[str], smoke: bool = False) -> Roofline:
    """Copy bandwidth of a large tensor (1 GiB on GPU) and a large square matmul per dtype
    (8192^3 on GPU), measured once per run."""
    big = device.type == "cuda" and not smoke
    n_bytes = (1 << 30) if big else (4 << 20)
    n = 8192 if big else 128
    gbps = _copy_gbps(device, n_bytes, smoke)
    tflops = {name: _matmul_tflops(device, n, DTYPES[name], smoke) for name in dtypes}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Roofline(tflops, gbps, f"copy {n_bytes >> 20} MiB, matmul {n}^3")


# ---- device and versions ----------------------------------------------------


def _run(cmd: list[str], timeout: float = 10) -> str:
    try:
        return subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    commit = _run(["git", "rev-parse", "--short=12", "HEAD"]) or os.environ.get("ARMOR_COMMIT", "unknown")
    if commit != "unknown" and _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "+dirty"
    return commit


def gpu_clocks() -> str:
    """Current and max SM/memory clocks, from pynvml or nvidia-smi; '' when neither is readable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        c = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
        return (
            f"sm={pynvml.nvmlDeviceGetClockInfo(h, c[0])}MHz mem={pynvml.nvmlDeviceGetClockInfo(h, c[1])}MHz "
            f"max_sm={pynvml.nvmlDeviceGetMaxClockInfo(h, c[0])}MHz"
        )
    except Exception:  # noqa: BLE001, S110 - pynvml missing or unusable: try nvidia-smi
        pass
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm", "--format=csv,noheader,nounits"])
        if out:
            sm, mem, max_sm = (v.strip() for v in out.splitlines()[0].split(","))
            return f"sm={sm}MHz mem={mem}MHz max_sm={max_sm}MHz"
    return ""


@functools.cache
def env_info(device_type: str) -> dict[str, str]:
    """The columns every result row carries: what ran where, with which versions."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "missing"
    cusparselt = ""
    if hasattr(torch.backends, "cusparselt"):
        try:
            cusparselt = str(torch.backends.cusparselt.version() or "")
        except Exception:  # noqa: BLE001
            cusparselt = ""
    if device_type == "cuda":
        gpu, clocks = torch.cuda.get_device_name(), gpu_clocks()
    else:
        gpu, clocks = f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)", ""
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": device_type,
        "gpu_name": gpu,
        "clocks": clocks,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda or ""),
        "cusparselt": cusparselt,
    }


ENV_COLUMNS = ["timestamp", "commit", "device", "gpu_name", "clocks", "torch", "triton", "cuda", "cusparselt"]


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- CSV --------------------------------------------------------------------


class CsvOut:
    """Appends rows to a CSV, one flushed line per row (a run cut short keeps what it measured).

    An existing file must have the same header; rows are dicts, missing keys are written empty.
    """

    def __init__(self, path: str | os.PathLike, columns: list[str]):
        self.path, self.columns = Path(path), columns
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            with self.path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if header != columns:
                raise ValueError(
                    f"{self.path}: existing header differs from this benchmark's columns; "
                    "write to a new file (--out) or delete it"
                )
        self._f = self.path.open("a", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=columns, extrasaction="raise")
        if fresh:
            self._w.writeheader()
            self._f.flush()

    def write(self, row: dict) -> None:
        self._w.writerow({k: _fmt(row.get(k, "")) for k in self.columns})
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else str(v)


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- random weights ---------------------------------------------------------


def random_24_mask(d_out: int, d_in: int, device, generator=None) -> torch.Tensor:
    """A random valid 2:4 mask (2 kept of every 4 input columns)."""
    from armor_kernels import sparse24

    scores = torch.rand(d_out, d_in, device=device, generator=generator)
    return sparse24.topk_mask(scores)


def random_armor_weights(d_out: int, d_in: int, block: int, dtype: torch.dtype, device, bias: bool = False):
    """Random ARMOR factors with a valid 2:4 core. Kernel speed does not depend on the
    values, so random factors time the same as solved ones. Wrappers are identity plus
    small noise so outputs stay O(1) and a correctness check is meaningful."""
    from armor_kernels import ArmorWeights, block_pair

    b_out, b_in = block_pair(d_out, d_in, block)
    core = torch.randn(d_out, d_in, device=device) / math.sqrt(d_in / 2)
    mask = random_24_mask(d_out, d_in, device)
    a = torch.eye(b_out, device=device) + 0.05 * torch.randn(d_out // b_out, b_out, b_out, device=device)
    b = torch.eye(b_in, device=device) + 0.05 * torch.randn(d_in // b_in, b_in, b_in, device=device)
    bvec = 0.1 * torch.randn(d_out, device=device) if bias else None
    return ArmorWeights.from_factors(a, core * mask, b, bias=bvec, mask=mask, dtype=dtype)
