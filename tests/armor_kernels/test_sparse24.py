import itertools

import pytest
import torch

from armor_kernels import sparse24
from armor_kernels.sparse24 import Sparse24Error


def _random_core(d_out, d_in, dtype=torch.float32):
    w = torch.randn(d_out, d_in, dtype=dtype)
    mask = sparse24.topk_mask(w.abs().float())
    return torch.where(mask, w, torch.zeros((), dtype=dtype)), mask


def _bits(t):
    """Bit patterns, so -0.0 and +0.0 differ."""
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    return t.view(view)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 32), (5, 12), (3, 4)])  # 12 and 4: odd group counts (padding nibble)
def test_round_trip_is_bit_exact(dtype, shape):
    core, mask = _random_core(*shape, dtype)
    values, meta = sparse24.compress(core, mask)
    assert values.shape == (shape[0], shape[1] // 2)
    assert meta.dtype == torch.uint8 and meta.shape == sparse24.meta_shape(*shape)
    sparse24.check_meta(meta, shape[1])
    assert torch.equal(_bits(sparse24.decompress(values, meta)), _bits(core))
    assert torch.equal(sparse24.dense_mask(meta, shape[1]), mask)


def test_every_keep_pattern_of_a_group_round_trips():
    # all 16 subsets of 4 positions; those with <= 2 kept are valid 2:4 and must round-trip,
    # the rest must be rejected
    for bits in range(16):
        keep = torch.tensor([[bool(bits >> k & 1) for k in range(4)]])
        vals = torch.tensor([[1.5, -2.0, 3.25, -4.0]])
        core = torch.where(keep, vals, 0.0)
        if int(keep.sum()) > 2:
            with pytest.raises(Sparse24Error, match="row 0, group 0"):
                sparse24.compress(core, keep)
            continue
        values, meta = sparse24.compress(core, keep)
        assert torch.equal(_bits(sparse24.decompress(values, meta)), _bits(core))
        assert torch.equal(sparse24.dense_mask(meta, 4) & keep, keep)  # kept positions stay kept


def test_negative_zero_and_kept_zeros_survive():
    core = torch.tensor([[-0.0, 0.0, 0.0, 0.0, 0.0, 7.0, -0.0, 0.0]])
    keep = torch.tensor([[True, True, False, False, False, True, True, False]])
    values, meta = sparse24.compress(core, keep)
    out = sparse24.decompress(values, meta)
    assert torch.equal(_bits(out), _bits(core))
    assert torch.signbit(out[0, 0]) and torch.signbit(out[0, 6])


def test_all_six_pairs_encode_to_valid_nibbles():
    for pair, code in zip(sparse24.PAIRS, sparse24.VALID_NIBBLES):
        keep = torch.zeros(1, 4, dtype=torch.bool)
        keep[0, list(pair)] = True
        _, meta = sparse24.compress(torch.where(keep, 1.0, 0.0), keep)
        assert int(meta[0, 0]) == code


def test_three_nonzeros_names_row_and_group():
    core, _ = _random_core(6, 16)
    core[4, 8:11] = torch.tensor([1.0, 2.0, 3.0])
    core[4, 11] = 0.0
    with pytest.raises(Sparse24Error, match=r"row 4, group 2 \(columns 8\.\.11\) keeps 3"):
        sparse24.check_core(core)
    with pytest.raises(Sparse24Error, match="row 4, group 2"):
        sparse24.compress(core)


def test_d_in_not_multiple_of_four_is_rejected():
    with pytest.raises(Sparse24Error, match="not a multiple of 4"):
        sparse24.compress(torch.zeros(2, 6))


@pytest.mark.parametrize("code", sorted(set(range(16)) - set(sparse24.VALID_NIBBLES)))
def test_invalid_metadata_nibbles_are_rejected(code):
    _, meta = sparse24.compress(*_random_core(2, 16)[::1])
    meta = meta.clone()
    meta[1, 1] = (meta[1, 1] & 0xF0) | code  # group 2 of row 1
    with pytest.raises(Sparse24Error, match="row 1, group 2"):
        sparse24.check_meta(meta, 16)


def test_nonzero_padding_nibble_is_rejected():
    _, meta = sparse24.compress(*_random_core(2, 12))
    meta = meta.clone()
    meta[0, -1] |= 0x40
    with pytest.raises(Sparse24Error, match="padding nibble"):
        sparse24.check_meta(meta, 12)


def test_topk_mask_keeps_two_largest_per_group():
    scores = torch.randn(7, 20)
    mask = sparse24.topk_mask(scores)
    sparse24.check_mask(mask, exact=True)
    groups, keep = scores.view(7, 5, 4), mask.view(7, 5, 4)
    for r, g in itertools.product(range(7), range(5)):
        kept = groups[r, g][keep[r, g]]
        dropped = groups[r, g][~keep[r, g]]
        assert kept.min() >= dropped.max()


def test_mask_derived_from_core_when_absent():
    core, _ = _random_core(4, 16)
    values, meta = sparse24.compress(core)
    assert torch.equal(sparse24.decompress(values, meta), core)
