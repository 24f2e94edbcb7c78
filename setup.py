"""Build: the pure-Python package always installs; the CUDA extension is optional.

The extension (``armor_kernels._C``, from ``csrc/``) is built only when nvcc and
cuSPARSELt are found and ``ARMOR_SKIP_CUDA_BUILD`` is unset; otherwise one line
says why. ``ARMOR_FORCE_CUDA_BUILD=1`` turns a skip (or a failed compile) into an error.

Switches (environment):

- ``ARMOR_SKIP_CUDA_BUILD=1``: never build the extension.
- ``ARMOR_FORCE_CUDA_BUILD=1``: fail instead of skipping.
- ``ARMOR_CUDA_ARCHS``: ``;``- or ``,``-separated SM targets, default ``80;90a`` (2:4 tensor cores start at sm_80).
- ``ARMOR_CUSPARSELT_ROOT``: a folder with ``include/cusparseLt.h`` and ``lib/libcusparseLt.so.0``;
  otherwise the ``nvidia-cusparselt-cu12``/``-cu13`` wheels in this interpreter's site-packages,
  then the CUDA toolkit and system folders.
- ``CUDA_HOME``/``CUDA_PATH``: the toolkit (else nvcc's own folder, then ``/usr/local/cuda``).

A CPU-only PyTorch cannot build a ``CUDAExtension``, so this is a plain pybind11
build: ``.cu`` files go through nvcc into objects, the host compiler compiles the
``.cpp`` files and links, with the CUDA runtime linked statically and cuSPARSELt
as ``-l:libcusparseLt.so.0`` with an rpath to the folder it was found in.
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CPP_SOURCES = [f"{CSRC}/bindings.cpp", f"{CSRC}/cusparselt_gemm.cpp", f"{CSRC}/expand24_host.cpp"]
CU_SOURCES = [f"{CSRC}/expand24.cu"]
HEADERS = [f"{CSRC}/armor_cuda.h", f"{CSRC}/expand24.h"]
DEFAULT_ARCHS = "80;90a"
LT_LIB = "libcusparseLt.so.0"  # the wheels ship no unversioned .so
# where the nvidia wheels put cuSPARSELt, relative to a site-packages folder (cu13 first: 0.10 ships a cusparse stub)
WHEEL_SUBDIRS = ("nvidia/cu13", "nvidia/cusparselt", "nvidia/cu12")
NVCC_FALLBACKS = ["/usr/local/cuda/bin/nvcc"]
SYSTEM_ROOTS = ["/usr", "/usr/local"]  # searched for cuSPARSELt after the wheels and the toolkit


def find_nvcc(env) -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var) and os.path.isfile(os.path.join(env[var], "bin", "nvcc")):
            return os.path.join(env[var], "bin", "nvcc")
    found = shutil.which("nvcc", path=env.get("PATH", ""))
    if found:
        return found
    return next((p for p in NVCC_FALLBACKS if os.path.isfile(p)), None)


def find_cuda_home(nvcc: str, env) -> str | None:
    """The toolkit folder holding cuda_runtime.h and the static CUDA runtime."""
    candidates = [env.get("CUDA_HOME"), env.get("CUDA_PATH"), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates += [os.path.dirname(os.path.dirname(p)) for p in NVCC_FALLBACKS]
    for root in filter(None, candidates):
        if os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")) and cudart_libdir(root):
            return root
    return None


def cudart_libdir(cuda_home: str) -> str | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if os.path.isfile(os.path.join(cuda_home, sub, "libcudart_static.a")):
            return os.path.join(cuda_home, sub)
    return None


def nvcc_major(nvcc: str) -> int | None:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.", out)
    return int(m.group(1)) if m else None


def site_dirs() -> list[str]:
    """Folders where pip puts wheels for the running interpreter, also from an isolated build env."""
    dirs = []
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # old virtualenv's site.py
        pass
    if site.ENABLE_USER_SITE is not False:
        dirs.append(site.getusersitepackages())
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
        dirs.append(os.path.join(prefix, "lib", version, "site-packages"))
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def _lt_pair(root: str) -> tuple[str, str] | None:
    inc = os.path.join(root, "include")
    if not os.path.isfile(os.path.join(inc, "cusparseLt.h")):
        return None
    for sub in ("lib", "lib64", "lib/x86_64-linux-gnu"):
        if os.path.isfile(os.path.join(root, sub, LT_LIB)):
            return inc, os.path.join(root, sub)
    return None


def find_cusparselt(env, dirs, cuda_home: str | None, major: int | None) -> tuple[str, str] | str:
    """(include dir, lib dir) of cuSPARSELt, or the reason it was not found."""
    root = env.get("ARMOR_CUSPARSELT_ROOT")
    if root:
        found = _lt_pair(root)
        return found or f"ARMOR_CUSPARSELT_ROOT={root} has no include/cusparseLt.h and lib/{LT_LIB}"
    # prefer the wheel built for this toolkit: -cu12 installs under nvidia/cusparselt (0.6-0.8) or nvidia/cu12
    subdirs = ["nvidia/cu12", "nvidia/cusparselt", "nvidia/cu13"] if major == 12 else list(WHEEL_SUBDIRS)
    for d in dirs:
        for sub in subdirs:
            found = _lt_pair(os.path.join(d, sub))
            if found:
                return found
    for sys_root in filter(None, [cuda_home, *SYSTEM_ROOTS]):
        found = _lt_pair(sys_root)
        if found:
            return found
    return (
        f"cuSPARSELt not found (no include/cusparseLt.h + {LT_LIB} under ARMOR_CUSPARSELT_ROOT, the "
        f"nvidia-cusparselt-cu12/-cu13 wheels in {dirs}, or the CUDA toolkit): pip install nvidia-cusparselt-cu13"
    )


def find_cusparse_include(lt_include: str, cuda_include: str, dirs) -> str | None:
    """A folder to add for cusparse.h ("" when none is needed), or None when it is missing.

    cusparseLt.h includes cusparse.h; cuSPARSELt 0.10 falls back to its own stub when it is absent.
    """
    for inc in (cuda_include, lt_include):
        if os.path.isfile(os.path.join(inc, "cusparse.h")):
            return ""
    for d in dirs:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cusparse/include"):
            if os.path.isfile(os.path.join(d, sub, "cusparse.h")):
                return os.path.join(d, sub)
    if os.path.isfile(os.path.join(lt_include, "cusparseLt_cusparse_stub.h")):
        return ""
    return None


def gencode_flags(env) -> list[str]:
    """nvcc -gencode flags for ARMOR_CUDA_ARCHS, plus PTX of the lowest for newer GPUs."""
    archs = [a.strip().removeprefix("sm_") for a in re.split(r"[;, ]+", env.get("ARMOR_CUDA_ARCHS") or DEFAULT_ARCHS)]
    archs = [a for a in archs if a]
    bad = [a for a in archs if not re.fullmatch(r"\d{2,3}[af]?", a)]
    if bad or not archs:
        raise ValueError(f"ARMOR_CUDA_ARCHS: {bad or 'empty'} are not SM targets like 80 or 90a")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    lowest = min(archs, key=lambda a: int(re.match(r"\d+", a).group()))
    if lowest.isdigit():  # arch-specific (90a) PTX does not run elsewhere
        flags.append(f"-gencode=arch=compute_{lowest},code=compute_{lowest}")
    return flags


def cuda_extension_or_reason(env=None, dirs=None):
    """(Extension, "") when the CUDA extension can be built here, else (None, why not)."""
    env = os.environ if env is None else env
    if env.get("ARMOR_SKIP_CUDA_BUILD"):
        return None, "ARMOR_SKIP_CUDA_BUILD is set"
    missing = [s for s in CPP_SOURCES + CU_SOURCES if not os.path.isfile(os.path.join(HERE, s))]
    if missing:
        return None, f"sources missing: {missing}"
    nvcc = find_nvcc(env)
    if nvcc is None:
        return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    cuda_home = find_cuda_home(nvcc, env)
    if cuda_home is None:
        return None, f"no CUDA toolkit with include/cuda_runtime.h and libcudart_static.a found for {nvcc}"
    try:
        gencode = gencode_flags(env)
    except ValueError as e:
        return None, str(e)
    dirs = site_dirs() if dirs is None else dirs
    lt = find_cusparselt(env, dirs, cuda_home, nvcc_major(nvcc))
    if isinstance(lt, str):
        return None, lt
    lt_include, lt_lib = lt
    cuda_include = os.path.join(cuda_home, "include")
    cusparse_inc = find_cusparse_include(lt_include, cuda_include, dirs)
    if cusparse_inc is None:
        return None, "cusparse.h not found (CUDA toolkit or pip install nvidia-cusparse-cu12)"
    include_dirs = [os.path.join(HERE, CSRC), cuda_include, lt_include] + ([cusparse_inc] if cusparse_inc else [])
    try:
        import pybind11
    except ImportError:
        return None, "pybind11 is not installed"
    include_dirs.insert(0, pybind11.get_include())
    # rpaths: the folder found now (editable installs, this machine), then the wheel layout
    # next to an installed armor_kernels/ (site-packages/nvidia/...), then the loader's default
    rpaths = [lt_lib] + [f"$ORIGIN/../{sub}/lib" for sub in WHEEL_SUBDIRS]
    ext = Extension(
        "armor_kernels._C",
        sources=CPP_SOURCES,
        include_dirs=include_dirs,
        library_dirs=[cudart_libdir(cuda_home), lt_lib],
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O3", "-g0", "-std=c++17", "-fvisibility=hidden"],
        extra_link_args=[f"-l:{LT_LIB}"] + [f"-Wl,-rpath,{p}" for p in rpaths],
        depends=HEADERS + CU_SOURCES,
        language="c++",
    )
    ext.cuda_sources = CU_SOURCES
    ext.nvcc = nvcc
    ext.nvcc_flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{os.path.join(HERE, CSRC)}", *gencode]
    return ext, ""


def _force(env) -> bool:
    return env.get("ARMOR_FORCE_CUDA_BUILD") == "1"


def resolve(env=None, dirs=None):
    """The extension to build, or None after one line saying why; SystemExit when forced but impossible."""
    env = os.environ if env is None else env
    ext, why = cuda_extension_or_reason(env, dirs)
    if ext is None:
        if _force(env):
            raise SystemExit(f"armor: ARMOR_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {why}")
        print(f"armor: building without the CUDA extension ({why}); the Triton and PyTorch backends still work")
    return ext


def _newer(sources, target) -> bool:
    if not os.path.exists(target):
        return True
    return max(os.path.getmtime(s) for s in sources) > os.path.getmtime(target)


class BuildExt(build_ext):
    """Compile ``.cu`` sources with nvcc into objects, then the usual host-compiler build and link."""

    def build_extension(self, ext):
        try:
            self._compile_cuda(ext)
            super().build_extension(ext)
        except Exception as e:
            if _force(os.environ):
                raise
            print(f"armor: the CUDA extension failed to build ({type(e).__name__}: {e}); continuing without it")

    def _compile_cuda(self, ext):
        objects = []
        for src in getattr(ext, "cuda_sources", []):
            obj = os.path.join(self.build_temp, os.path.splitext(src)[0] + ".o")
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            deps = [os.path.join(HERE, s) for s in [src] + HEADERS]
            if self.force or _newer(deps, obj):
                cmd = [ext.nvcc, "-c", os.path.join(HERE, src), "-o", obj, *ext.nvcc_flags]
                print(" ".join(cmd))
                subprocess.run(cmd, check=True)
            objects.append(obj)
        ext.extra_objects = list(ext.extra_objects or []) + objects


if __name__ == "__main__":
    ext = resolve()
    setup(ext_modules=[] if ext is None else [ext], cmdclass={"build_ext": BuildExt})
