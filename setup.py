"""Build: the pure-Python package always installs; the CUDA extension is optional.

The extension (``armor_kernels._C``, from ``csrc/``) is built only when nvcc and
cuSPARSELt are found and ``ARMOR_SKIP_CUDA_BUILD`` is unset; otherwise one line
says why. ``ARMOR_FORCE_CUDA_BUILD=1`` turns a skip into an error.
"""

import os
import sys

from setuptools import setup


def cuda_extension_or_reason():
    if os.environ.get("ARMOR_SKIP_CUDA_BUILD"):
        return None, "ARMOR_SKIP_CUDA_BUILD is set"
    return None, "csrc/ has no extension sources yet"


ext, why = cuda_extension_or_reason()
if ext is None:
    if os.environ.get("ARMOR_FORCE_CUDA_BUILD") == "1":
        sys.exit(f"armor: ARMOR_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {why}")
    print(f"armor: building without the CUDA extension ({why}); the Triton and PyTorch backends still work")

setup(ext_modules=[] if ext is None else [ext])
