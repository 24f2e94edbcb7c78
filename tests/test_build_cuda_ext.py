"""setup.py's CUDA-extension detection (with patched environments and fake toolkits) and the built module."""

from __future__ import annotations

import glob
import os
import runpy
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_mod():
    # run_name != "__main__": defines the functions without calling setup()
    g = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="armor_setup")
    g = g["resolve"].__globals__  # run_path returns a copy; patch the functions' own globals
    g["NVCC_FALLBACKS"] = []  # hermetic: only what a test lays out is found
    g["SYSTEM_ROOTS"] = []
    return g


@pytest.fixture
def pybind11_present():
    """The build needs pybind11 (the [dev] extra brings it); without it these cases cannot get past detection."""
    pytest.importorskip("pybind11", reason="pybind11 is not installed (pip install -e '.[dev]')")


def _touch(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture
def fake_cuda(tmp_path):
    """A toolkit folder whose nvcc only answers --version."""
    home = tmp_path / "cuda"
    nvcc = _touch(str(home / "bin" / "nvcc"), "#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    os.chmod(nvcc, os.stat(nvcc).st_mode | stat.S_IEXEC)
    _touch(str(home / "include" / "cuda_runtime.h"))
    _touch(str(home / "lib64" / "libcudart_static.a"))
    return str(home)


def _fake_wheel(site_dir, sub="nvidia/cu13", stub=True):
    base = os.path.join(site_dir, sub)
    _touch(os.path.join(base, "include", "cusparseLt.h"))
    if stub:
        _touch(os.path.join(base, "include", "cusparseLt_cusparse_stub.h"))
    _touch(os.path.join(base, "lib", "libcusparseLt.so.0"))
    return base


def test_skip_switch(setup_mod):
    ext, why = setup_mod["cuda_extension_or_reason"]({"ARMOR_SKIP_CUDA_BUILD": "1"}, [])
    assert ext is None and why == "ARMOR_SKIP_CUDA_BUILD is set"


def test_no_nvcc(setup_mod, tmp_path):
    ext, why = setup_mod["cuda_extension_or_reason"]({"PATH": str(tmp_path)}, [])
    assert ext is None and "nvcc not found" in why


def test_no_cusparselt(setup_mod, fake_cuda, tmp_path):
    env = {"CUDA_HOME": fake_cuda, "PATH": ""}
    ext, why = setup_mod["cuda_extension_or_reason"](env, [str(tmp_path / "empty-site")])
    assert ext is None and "cuSPARSELt not found" in why and "nvidia-cusparselt" in why


def test_cusparselt_root_must_hold_the_files(pybind11_present, setup_mod, fake_cuda, tmp_path):
    env = {"CUDA_HOME": fake_cuda, "ARMOR_CUSPARSELT_ROOT": str(tmp_path / "nowhere")}
    ext, why = setup_mod["cuda_extension_or_reason"](env, [])
    assert ext is None and "ARMOR_CUSPARSELT_ROOT" in why
    root = _fake_wheel(str(tmp_path), "lt")
    ext, why = setup_mod["cuda_extension_or_reason"](dict(env, ARMOR_CUSPARSELT_ROOT=root), [])
    assert why == "" and os.path.join(root, "lib") in ext.library_dirs


def test_found_in_wheel_builds_extension(pybind11_present, setup_mod, fake_cuda, tmp_path):
    site_dir = str(tmp_path / "site")
    base = _fake_wheel(site_dir)
    ext, why = setup_mod["cuda_extension_or_reason"]({"CUDA_HOME": fake_cuda}, [site_dir])
    assert why == "" and ext.name == "armor_kernels._C"
    lib = os.path.join(base, "lib")
    assert "-l:libcusparseLt.so.0" in ext.extra_link_args
    assert f"-Wl,-rpath,{lib}" in ext.extra_link_args
    assert "cudart_static" in ext.libraries  # no libcudart.so needed at run time
    assert ext.nvcc == os.path.join(fake_cuda, "bin", "nvcc")
    flags = " ".join(ext.nvcc_flags)
    assert "code=sm_80" in flags and "code=sm_90a" in flags
    assert all(os.path.isfile(os.path.join(ROOT, s)) for s in ext.sources + ext.cuda_sources)


def test_cusparse_header_needed_without_stub(pybind11_present, setup_mod, fake_cuda, tmp_path):
    site_dir = str(tmp_path / "site")
    _fake_wheel(site_dir, "nvidia/cu12", stub=False)
    ext, why = setup_mod["cuda_extension_or_reason"]({"CUDA_HOME": fake_cuda}, [site_dir])
    assert ext is None and "cusparse.h" in why
    inc = os.path.dirname(_touch(os.path.join(site_dir, "nvidia", "cusparse", "include", "cusparse.h")))
    ext, why = setup_mod["cuda_extension_or_reason"]({"CUDA_HOME": fake_cuda}, [site_dir])
    assert why == "" and inc in ext.include_dirs


def test_cuda_archs(setup_mod):
    flags = setup_mod["gencode_flags"]({"ARMOR_CUDA_ARCHS": "sm_89, 90a"})
    assert flags[:2] == ["-gencode=arch=compute_89,code=sm_89", "-gencode=arch=compute_90a,code=sm_90a"]
    assert flags[-1] == "-gencode=arch=compute_89,code=compute_89"  # PTX for newer GPUs
    with pytest.raises(ValueError, match="ARMOR_CUDA_ARCHS"):
        setup_mod["gencode_flags"]({"ARMOR_CUDA_ARCHS": "ampere"})


def test_force_turns_skip_into_error(setup_mod, capsys):
    assert setup_mod["resolve"]({"ARMOR_SKIP_CUDA_BUILD": "1"}, []) is None
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "building without the CUDA extension (ARMOR_SKIP_CUDA_BUILD is set)" in line
    with pytest.raises(SystemExit, match="ARMOR_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built"):
        setup_mod["resolve"]({"ARMOR_SKIP_CUDA_BUILD": "1", "ARMOR_FORCE_CUDA_BUILD": "1"}, [])


# ---- the module built in this checkout (CI builds it with ARMOR_FORCE_CUDA_BUILD=1) ----------

BUILT = sorted(glob.glob(os.path.join(ROOT, "armor_kernels", "_C*.so")))
needs_build = pytest.mark.skipif(not BUILT, reason="armor_kernels._C is not built in this checkout")


@needs_build
@pytest.mark.skipif(not shutil.which("nm") or not shutil.which("readelf"), reason="binutils (nm, readelf) missing")
def test_built_module_exports_bindings():
    so = BUILT[0]
    symbols = subprocess.run(["nm", "-D", so], capture_output=True, text=True, check=True).stdout
    assert " T PyInit__C" in symbols
    for call in ("cusparseLtSpMMACompress2", "cusparseLtMatmulSearch", "cusparseLtMatmul", "cusparseLtMatmulPlanInit"):
        assert f" U {call}\n" in symbols, call
    dynamic = subprocess.run(["readelf", "-d", so], capture_output=True, text=True, check=True).stdout
    assert "[libcusparseLt.so.0]" in dynamic
    assert "libcudart.so" not in dynamic  # the CUDA runtime is linked statically


@needs_build
def test_built_module_loads_or_names_the_missing_library():
    code = "from armor_kernels import cuda_ext as c; print(c._C is not None); print(c.available()[1])"
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr
    loaded, why = run.stdout.splitlines()[:2]
    if loaded == "False":
        assert "libcusparseLt.so.0" in why or "libcuda" in why, why
    else:  # loaded: without a GPU, CUDA's own error says why it cannot run
        import torch

        if not torch.cuda.is_available():
            assert "cudaGetDeviceCount" in why or "no CUDA device" in why, why
