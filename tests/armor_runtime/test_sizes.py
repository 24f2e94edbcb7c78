"""Byte accounting: the 2:4 core is 9/16 of dense; wrappers add 2·(b_out·d_out + b_in·d_in) bytes."""

import pytest
import torch

from armor_kernels import layer_bytes
from armor_runtime.linear import ArmorLinear
from armor_runtime.sizes import model_layer_bytes


@pytest.mark.parametrize("d_out,d_in,bo,bi", [(576, 576, 96, 96), (1536, 576, 128, 96), (576, 1536, 96, 128),
                                              (192, 576, 96, 96), (48, 20, 16, 20)])
def test_layer_bytes_match_real_buffers(d_out, d_in, bo, bi):
    sizes = layer_bytes(d_out, d_in, bo, bi, elem=2)
    layer = ArmorLinear(d_in, d_out, bias=False, block_out=bo, block_in=bi, dtype=torch.bfloat16)
    real = {k: t.nbytes for k, t in layer.state_dict().items()}
    assert sizes["armor_core"] == real["values"] + real["meta"]
    assert sizes["armor_wrappers"] == real["a"] + real["b"] == 2 * (bo * d_out + bi * d_in)
    assert sizes["dense"] == 2 * d_out * d_in
    if d_in % 8 == 0:  # no padding nibble: values + metadata are exactly 9/16 of dense
        assert sizes["plain24"] * 16 == sizes["dense"] * 9
    else:
        assert sizes["plain24"] * 16 > sizes["dense"] * 9


def test_model_layer_bytes_sums():
    layers = {"x": (64, 64, 32, 32), "y": (32, 64, 16, 32)}
    total = model_layer_bytes(layers)
    assert total["dense"] == 2 * (64 * 64 + 32 * 64)
    assert total["armor"] == total["armor_core"] + total["armor_wrappers"]


def test_checkpoint_bytes_match_the_layer_formula(saved_llama):
    from armor_runtime.sizes import checkpoint_bytes, weight_bytes

    b = checkpoint_bytes(saved_llama)
    assert b["layers"] == 14
    assert b["implied"] == b["tensors"]  # nothing stored beyond what the block sizes imply
    assert 0 < b["headers"] < 20_000 and b["files"] == weight_bytes(saved_llama) == b["tensors"] + b["headers"]
    # fp32 tiny Llama: down_proj 64x96 with 16-wide blocks, every other projection 32-wide
    assert b["wrappers"] == 4 * 2 * (16 * 64 + 16 * 96) + 4 * 2 * sum(32 * (o + i) for o, i in
                                                                      [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64)])
