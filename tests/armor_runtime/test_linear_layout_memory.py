"""Memory held by a prepared ArmorLinear: one copy of the core by default, exactly one more with the opt-in.

The two cuSPARSELt backends run here as CPU stand-ins: the real backend classes (their
caches, opt-in rules and release logic) with the device checks opened to CPU, the
compression replaced by a buffer of cuSPARSELt's size (9/16 of the dense bytes), and the
product computed by the reference. The CPU rows of the selection table are the CUDA ones.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from armor_kernels import cuda_ext, dispatch, reference, sparse24
from armor_kernels.backends import cuda_ext as cuda_backend
from armor_kernels.backends import torch_sparse
from armor_runtime.linear import ArmorLinear

D_OUT, D_IN = 128, 256
COPY_BYTES = D_OUT * D_IN * 2 * 9 // 16  # cuSPARSELt's compressed fp16 core: 9/16 of dense


class CpuCudaExt(cuda_backend.CudaExtBackend):
    device_types, min_capability = ("cpu",), None

    def is_available(self):
        return True, ""


class CpuTorchSparse(torch_sparse.TorchSparseBackend):
    device_types, min_capability = ("cpu",), None

    def is_available(self):
        return True, ""


@pytest.fixture
def gpu_like(monkeypatch):
    """Stand-in backends in the real ones' places; compressed buffers remember their core weakly."""
    cores: dict[int, tuple] = {}

    def packed_for(values, meta):
        buf = torch.empty(COPY_BYTES, dtype=torch.uint8)
        cores[buf.data_ptr()] = (weakref.ref(values), weakref.ref(meta))
        return buf

    def product(buf, x, bias):
        values, meta = (r() for r in cores[buf.data_ptr()])
        return reference.sparse24_matmul(x, values, meta, bias)

    monkeypatch.setattr(cuda_ext, "compress", lambda v, m: cuda_ext.CompressedCore(packed_for(v, m), *v.shape, v.dtype))
    monkeypatch.setattr(cuda_ext, "sparse24_mm", lambda x, core, bias=None: product(core.buffer, x, bias))
    monkeypatch.setattr(cuda_ext, "expanded_mm", reference.sparse24_matmul)
    # torch_sparse compresses the dense core: find the layer's tensors by the dense matrix's values
    monkeypatch.setattr(
        torch_sparse.TorchSparseBackend, "_compressed", lambda self, v, m: self._packed.get(v, lambda: packed_for(v, m))
    )
    monkeypatch.setattr(torch_sparse, "matmul", lambda buf, x, d_out, bias=None: product(buf, x, bias))
    table = {**dispatch._load(), "cuda_ext": CpuCudaExt(), "torch_sparse": CpuTorchSparse()}
    monkeypatch.setattr(dispatch, "_backends", table)
    monkeypatch.setitem(dispatch.SELECTION, "cpu", dispatch.SELECTION["cuda"])
    monkeypatch.setenv("ARMOR_DISABLED_BACKENDS", "triton")  # decode on the reference: no interpreter runs here
    for var in ("ARMOR_CUSPARSELT_LAYOUT", "ARMOR_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    dispatch.reset()
    dispatch.release()  # layouts of layers other tests left alive would count in the totals below
    return table


def _layer(bias=True) -> ArmorLinear:
    core = torch.randn(D_OUT, D_IN)
    mask = sparse24.topk_mask(core.abs())
    from armor_kernels import ArmorWeights

    w = ArmorWeights.from_factors(
        torch.randn(D_OUT // 32, 32, 32) / 6, torch.where(mask, core, 0.0) / 12, torch.randn(D_IN // 32, 32, 32) / 6,
        bias=torch.randn(D_OUT) if bias else None, mask=mask, dtype=torch.float16,
    )  # fmt: skip
    return ArmorLinear.from_weights(w)


def _own_bytes(layer: ArmorLinear) -> int:
    return sum(t.nbytes for t in layer.buffers())


def _run_every_regime(layer: ArmorLinear) -> None:
    for tokens in dispatch.REGIME_TOKENS.values():
        x = torch.randn(tokens, D_IN).half()
        torch.testing.assert_close(
            layer(x).float(),
            reference.armor_linear(x.float(), *(t.float() for t in (layer.a, layer.values)), layer.meta,
                                   layer.b.float(), layer.bias.float()),
            rtol=2e-2, atol=2e-2,
        )  # fmt: skip


def test_default_layer_holds_one_copy_of_its_core(gpu_like):
    layer = _layer()
    _run_every_regime(layer)
    assert dispatch.layout_bytes() == {}
    held = _own_bytes(layer) + sum(dispatch.layout_bytes(layer.values).values())
    assert held <= 1.05 * _own_bytes(layer)
    # the prefill path is the extension's, reading values/meta (expand + GEMM), not a copy
    assert "cuda_ext" in layer.backends()["prefill"]


def test_opt_in_adds_exactly_one_compressed_copy(gpu_like, monkeypatch):
    monkeypatch.setenv("ARMOR_CUSPARSELT_LAYOUT", "1")
    dispatch.reset()
    layer = _layer()
    assert dispatch.layout_bytes() == {"cuda_ext": COPY_BYTES}  # built at load time, not in forward
    _run_every_regime(layer)
    assert dispatch.layout_bytes() == {"cuda_ext": COPY_BYTES}
    assert dispatch.report()["cusparselt_layout"] is True
    # without the extension the copy is PyTorch's cuSPARSELt's instead: still one
    monkeypatch.setenv("ARMOR_DISABLED_BACKENDS", "triton,cuda_ext")
    dispatch.reset()
    layer.prepare()
    assert dispatch.layout_bytes() == {"torch_sparse": COPY_BYTES}  # and the extension's copy is freed
    _run_every_regime(layer)
    assert dispatch.layout_bytes() == {"torch_sparse": COPY_BYTES}


def test_a_switch_frees_what_is_no_longer_needed(gpu_like, monkeypatch):
    monkeypatch.setenv("ARMOR_CUSPARSELT_LAYOUT", "1")
    dispatch.reset()
    layer = _layer(bias=False)
    assert dispatch.layout_bytes() == {"cuda_ext": COPY_BYTES}
    monkeypatch.delenv("ARMOR_CUSPARSELT_LAYOUT")  # opt-in off: preparing again frees the copy
    dispatch.reset()
    layer.prepare()
    assert dispatch.layout_bytes() == {}
    monkeypatch.setenv("ARMOR_CUSPARSELT_LAYOUT", "1")
    dispatch.reset()
    layer.prepare()
    assert dispatch.layout_bytes() == {"cuda_ext": COPY_BYTES}
    layer.float()  # new tensors (fp32: no cuSPARSELt): the old copy goes with the old values
    gc.collect()
    assert dispatch.layout_bytes() == {}
    layer.half()
    assert dispatch.layout_bytes() == {"cuda_ext": COPY_BYTES}
    del layer
    gc.collect()
    assert dispatch.layout_bytes() == {}  # weak-keyed: a freed layer frees its copy
