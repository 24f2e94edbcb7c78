import pytest
import torch

from armor_kernels import ArmorFormatError, ArmorWeights, choose_block_size, sparse24, valid_block_sizes
from tests.helpers import random_layer_weights


def make_weights(d_out=16, d_in=32, b_out=8, b_in=8, dtype=torch.float32, bias=True):
    return random_layer_weights(d_out, d_in, b_out, b_in, dtype, bias)


def test_shapes_and_properties():
    w = make_weights(16, 32, 4, 8, dtype=torch.bfloat16)
    assert (w.d_out, w.d_in, w.block_out, w.block_in) == (16, 32, 4, 8)
    assert w.dtype == torch.bfloat16 and w.meta.dtype == torch.uint8
    assert w.a.shape == (4, 4, 4) and w.b.shape == (4, 8, 8) and w.values.shape == (16, 16)
    assert set(w.tensors()) == {"a", "values", "meta", "b", "bias"}
    assert "bias" not in make_weights(bias=False).tensors()


def test_core_bytes_are_nine_sixteenths_of_dense():
    w = make_weights(64, 128, 8, 8, dtype=torch.float16)
    dense_bytes = 64 * 128 * 2
    assert w.nbytes()["core"] * 16 == dense_bytes * 9


def test_from_dense_gives_identity_wrappers():
    w = torch.randn(8, 16)
    mask = sparse24.topk_mask(w.abs())
    packed = ArmorWeights.from_dense(torch.where(mask, w, 0.0), 1, 4, mask=mask)
    assert torch.equal(packed.a, torch.ones(8, 1, 1))
    assert torch.equal(packed.b, torch.eye(4).expand(4, 4, 4))


def test_to_keeps_meta_uint8():
    w = make_weights().to(torch.float16)
    assert w.values.dtype == torch.float16 and w.a.dtype == torch.float16
    assert w.meta.dtype == torch.uint8
    w.validate()
    assert make_weights().to("meta").meta.device.type == "meta"


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda w: setattr(w, "a", torch.randn(3, 5, 5)), r"a: 3 blocks of 5 do not tile d_out = 16"),
        (lambda w: setattr(w, "b", torch.randn(2, 16, 8)), r"b: expected square blocks"),
        (lambda w: setattr(w, "b", torch.randn(5, 6, 6)), r"b: 5 blocks of 6 do not tile d_in = 32"),
        (lambda w: setattr(w, "values", torch.randn(16, 15)), r"d_in = 30 is not a multiple of 4"),
        (lambda w: setattr(w, "bias", torch.randn(3)), r"bias: expected shape \(16,\)"),
        (lambda w: setattr(w, "a", w.a.half()), r"a: dtype torch.float16 differs from values' torch.float32"),
        (lambda w: setattr(w, "values", w.values.int()), r"values: dtype torch.int32 is not one of"),
        (lambda w: w.values.__setitem__((2, 3), float("nan")), r"values: contains NaN or Inf"),
        (lambda w: w.b.__setitem__((0, 0, 0), float("inf")), r"b: contains NaN or Inf"),
        (lambda w: setattr(w, "meta", w.meta.to(torch.int16)), r"meta: dtype must be torch.uint8"),
        (lambda w: setattr(w, "meta", w.meta[:, :2]), r"meta: shape \(16, 2\) does not match d_in = 32"),
        (lambda w: w.meta.__setitem__((5, 1), 0xFF), r"meta: row 5, group 2 .* has pattern"),
        (lambda w: setattr(w, "bias", w.bias.to("meta")), r"bias: on meta, values on cpu"),
    ],
)
def test_validate_names_tensor_and_rule(mutate, pattern):
    w = make_weights()
    mutate(w)
    with pytest.raises(ArmorFormatError, match=pattern):
        w.validate()


def test_validate_prefix_names_the_layer():
    w = make_weights()
    w.a = torch.randn(3, 5, 5)
    with pytest.raises(ArmorFormatError, match=r"model\.layers\.0\.q_proj\.a:"):
        w.validate("model.layers.0.q_proj")


def test_input_block_must_be_multiple_of_four():
    with pytest.raises(ArmorFormatError, match="b: block size 2 is not a multiple of 4"):
        make_weights(8, 16, 8, 2)


def test_non_24_core_is_rejected_at_packing():
    w = torch.randn(4, 8)
    with pytest.raises(sparse24.Sparse24Error, match=r"row 0, group 0 .* keeps 4"):
        ArmorWeights.from_factors(torch.eye(4)[None], w, torch.eye(8)[None])


def test_block_size_choice():
    assert choose_block_size(4096, 128) == 128
    assert choose_block_size(576, 128, multiple_of=4) == 96
    assert choose_block_size(192, 128) == 96
    assert choose_block_size(1536, 128) == 128
    assert valid_block_sizes(12, 4) == [4, 12]
    with pytest.raises(ArmorFormatError, match="no block size"):
        choose_block_size(6, 128, multiple_of=4)


@pytest.mark.parametrize("d_out,d_in,expected", [
    (576, 576, (18, 16)),  # SmolLM2 attention: 34/576 = 5.9 %
    (192, 576, (8, 8)),  # SmolLM2 k/v: 8/576 + 8/192 = 5.6 %
    (1536, 576, (24, 24)),
    (4096, 4096, (128, 128)),  # the paper's setting is exactly the budget
    (14336, 4096, (128, 128)),  # capped at 128
    (64, 32, (1, 4)),  # no block fits 6.25 % of so small a layer: the cheapest pair
])
def test_block_pair_is_the_largest_within_the_wrapper_budget(d_out, d_in, expected):
    from armor_kernels import WRAPPER_BUDGET, block_pair, wrapper_overhead

    bo, bi = block_pair(d_out, d_in)
    assert (bo, bi) == expected
    assert d_out % bo == 0 and d_in % bi == 0 and bi % 4 == 0
    if (bo, bi) != (1, 4):
        assert wrapper_overhead(d_out, d_in, bo, bi) <= WRAPPER_BUDGET
    # no larger preferred size (up to 128) stays within the budget
    for p in range(max(bo, bi) + 1, 129):
        pair = block_pair(d_out, d_in, p)
        assert pair == (bo, bi) or wrapper_overhead(d_out, d_in, *pair) > WRAPPER_BUDGET


def test_block_pair_with_a_preferred_size_and_other_budgets():
    from armor_kernels import block_pair

    assert block_pair(576, 576, 128) == (96, 96)  # a preferred size: the largest valid divisors
    assert block_pair(576, 1536, 128) == (96, 128)
    assert block_pair(576, 576, budget=1 / 3) == (96, 96)  # 192/576 = the budget exactly
    assert block_pair(576, 576, budget=0.01) == (1, 4)
    assert block_pair(4096, 4096, budget=0.5, largest=64) == (64, 64)
    with pytest.raises(ArmorFormatError):
        block_pair(576, 578, 128)  # d_in not a multiple of 4

