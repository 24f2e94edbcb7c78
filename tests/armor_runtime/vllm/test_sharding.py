"""Tensor-parallel slices of an ARMOR layer (the rules the vLLM plugin loads by), checked without vLLM."""

import sys

import pytest
import torch

import armor_kernels
from armor_kernels import ArmorWeights, reference, sparse24
from armor_runtime.vllm import sharding


def make(d_out=64, d_in=96, bo=16, bi=24, bias=True):
    core = torch.randn(d_out, d_in)
    mask = sparse24.topk_mask(core.abs())
    return ArmorWeights.from_factors(
        torch.eye(bo) + 0.2 * torch.randn(d_out // bo, bo, bo), torch.where(mask, core, 0.0),
        torch.eye(bi) + 0.2 * torch.randn(d_in // bi, bi, bi), bias=torch.randn(d_out) if bias else None, mask=mask,
    )  # fmt: skip


def local(w, split, index, n):
    return [sharding.local_part(k, getattr(w, k), split, index, n) for k in ("a", "values", "meta", "b")]


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_column_parallel_ranks_concatenate_to_the_full_layer(degree):
    w = make()
    x = torch.randn(5, 96)
    n = 64 // degree
    sharding.check_column("layer", 64, 16, degree, n)
    parts = []
    for r in range(degree):
        a, values, meta, b = local(w, "rows", r, n)
        assert a.shape == (n // 16, 16, 16) and values.shape == (n, 48) and b.shape == w.b.shape
        ArmorWeights(a, values, meta, b).validate(f"rank {r}")
        parts.append(armor_kernels.armor_linear(x, a, values, meta, b, None))
    want = reference.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias)
    torch.testing.assert_close(torch.cat(parts, -1) + w.bias, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_row_parallel_partial_outputs_with_a_applied_sum_to_the_full_layer(degree):
    w = make(d_in=192, bi=24)  # 192 / 4 = 48 columns per rank: 2 B blocks, 6 meta bytes
    x = torch.randn(5, 192)
    m = 192 // degree
    sharding.check_row("layer", 192, 24, degree)
    total = torch.zeros(5, 64)
    for r in range(degree):
        a, values, meta, b = local(w, "cols", r, m)
        assert torch.equal(a, w.a) and values.shape == (64, m // 2) and meta.shape == (64, m // 8)
        ArmorWeights(a, values, meta, b).validate(f"rank {r}")
        bias = w.bias if r == 0 else None  # added once, as vLLM does on rank 0
        total += armor_kernels.armor_linear(x[:, r * m:(r + 1) * m].contiguous(), a, values, meta, b, bias)
    want = reference.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-4)


def test_misaligned_column_degree_is_refused_naming_layer_block_and_degree():
    with pytest.raises(sharding.ShardingError) as e:
        sharding.check_column("model.layers.0.self_attn.k_proj", 64, 64, 2, 32)
    msg = str(e.value)
    for part in ("model.layers.0.self_attn.k_proj", "tensor-parallel degree 2", "block size 64", "degrees [1]"):
        assert part in msg
    with pytest.raises(sharding.ShardingError, match=r"degrees \[1, 2, 4\]"):
        sharding.check_column("q", 64, 16, 8, 8)


def test_misaligned_row_degree_is_refused_naming_layer_block_and_degree():
    # 576 inputs, blocks of 96: 3 ranks get 192 columns each (2 blocks, 24 bytes); 2 ranks get 288 (3 blocks)
    sharding.check_row("o_proj", 576, 96, 3)
    sharding.check_row("o_proj", 576, 96, 2)
    with pytest.raises(sharding.ShardingError) as e:
        sharding.check_row("model.layers.3.self_attn.o_proj", 576, 96, 4)
    msg = str(e.value)
    for part in ("model.layers.3.self_attn.o_proj", "tensor-parallel degree 4", "block size 96", "[1, 2, 3, 6]"):
        assert part in msg
    with pytest.raises(sharding.ShardingError, match="metadata byte"):
        sharding.check_row("down_proj", 40, 4, 2)  # 20 columns: 5 whole B blocks, but 2.5 meta bytes


def test_the_sharding_rules_import_without_vllm():
    assert "vllm" not in sys.modules  # vLLM is not in this environment, and nothing here asked for it


def smollm2_like(block: int, layers: dict | None = None) -> dict:
    qc = {"quant_method": "armor", "format_version": 1, "sparsity_structure": "2:4", "targets": ["q_proj"],
          "ignore": [], "block_size": {"default": [block, block], "layers": layers or {}}}
    return {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "intermediate_size": 1536,
            "quantization_config": qc}


def test_which_degrees_a_checkpoint_allows():
    # `armor prune` at its default block size 128: blocks of 96 on the 576/192-wide sides, 128 on 1536
    default = smollm2_like(96, {"model.layers.0.mlp.gate_proj": [128, 96], "model.layers.0.mlp.down_proj": [96, 128]})
    assert sharding.why_not(default, 1) == ""
    assert sharding.why_not(default, 2) == "vLLM: 9 attention heads do not split over 2 ranks"
    why = sharding.why_not(default, 3)  # k_proj: 192 rows, 3 KV heads -> 64 rows per rank, blocks of 96
    assert why.startswith("k_proj: tensor-parallel degree 3 gives 64 of its 192 output rows") and "block size 96" in why
    assert sharding.why_not(smollm2_like(64), 3) == ""  # --block-size 64: every side splits in 3
    assert "KV heads" in sharding.why_not({**smollm2_like(64), "num_key_value_heads": 2}, 3)


def test_sharding_command_prints_each_degree(capsys, tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(smollm2_like(64)))
    assert sharding.main([str(tmp_path), "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tensor-parallel degree 1: yes" and lines[2] == "tensor-parallel degree 3: yes"
    assert lines[1].startswith("tensor-parallel degree 2: no: vLLM: 9 attention heads")
