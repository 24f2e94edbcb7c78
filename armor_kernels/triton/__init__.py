"""Triton kernels (``@triton.jit`` only; launchers live in ``armor_kernels.backends.triton``).

- ``blockdiag``: ``y = x · blockdiag(W)ᵀ (+ bias)``, the input and output wrappers.
- ``sparse24_small``: ``z = x Sᵀ`` for few tokens straight from the packed 2:4
  values and 4-bit metadata, with the output wrapper ``A`` and the bias fused
  into the epilogue, and an in-kernel split-K reduction.

Importing this package imports triton; callers guard it.
"""
