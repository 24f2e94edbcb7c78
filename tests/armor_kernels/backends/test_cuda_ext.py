"""The extension's plan policy on CPU, against a stand-in for the compiled module.

The stand-in keeps the compiled module's calling convention (integer addresses, plans
that must exist before ``matmul``, a workspace that must be large enough) and records
every call, so the rules of ``armor_kernels.cuda_ext`` are checked without a GPU: no plan
per fresh bias or alpha, the bucket's searched configuration falling back to the default
when it does not build, the search workspace sized by cuSPARSELt's own query, the search
deferred out of a CUDA-graph capture.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from armor_kernels import cuda_ext

N, K = 32, 64


class StandInError(RuntimeError):
    """Stands in for ``armor_kernels._C.CudaExtError`` (a RuntimeError)."""


class StandInC:
    """What ``armor_kernels._C`` does, minus the GPU: plans are dicts, matmul zero-fills ``out``."""

    def __init__(self, workspace_by_alg=None, chosen=(2, 2), chosen_workspace=None, refuse=None, search_fails=False):
        self.search_fails = search_fails
        self.workspace_by_alg = workspace_by_alg or {0: 1000, 1: 3 << 20, 2: 500, 3: 2000}
        self.chosen = chosen  # (alg_id, split_k) the search picks
        self.chosen_workspace = chosen_workspace  # workspace the chosen configuration reports
        self.refuse = refuse or (lambda tokens, alg_id, split_k: False)
        self.plans: dict[tuple, dict] = {}
        self.plan_calls, self.searches, self.matmuls, self.cleared = [], [], [], 0

    def _info(self, problem, alg_id, split_k, mode, buffers):
        device, _dtype, n, k, tokens, bias, alpha_vector = problem
        alg = max(alg_id, 0)
        return {
            "device": device, "dtype": "float16", "n": n, "k": k, "tokens": tokens, "has_bias": bool(bias),
            "alpha_vector": alpha_vector, "searched": False, "alg_id": alg, "max_alg_id": max(self.workspace_by_alg),
            "split_k": split_k, "split_k_mode": mode, "split_k_buffers": buffers,
            "workspace": self.workspace_by_alg.get(alg, 0),
        }  # fmt: skip

    def plan(self, device, dtype, n, k, tokens, bias, alpha_vector, alg_id=-1, split_k=1, mode=0, buffers=0):
        problem = (device, dtype, n, k, tokens, bias, alpha_vector)
        self.plan_calls.append((problem, alg_id, split_k))
        if alg_id >= 0 and self.refuse(tokens, alg_id, split_k):
            raise StandInError(f"cusparseLtMatmulPlanInit failed for x[{tokens}]: CUSPARSE_STATUS_NOT_SUPPORTED")
        self.plans[problem] = self._info(problem, alg_id, split_k, mode, buffers)
        return dict(self.plans[problem])

    def plan_workspace(self, device, dtype, n, k, tokens, bias, alpha_vector, alg_id):
        if alg_id not in self.workspace_by_alg:
            raise StandInError(f"alg {alg_id} does not build")
        return self.workspace_by_alg[alg_id]

    def search(
        self, device, dtype, n, k, tokens, bias, alpha_vector, x, compressed, out, alpha_ptr, alpha, ws, size, s
    ):
        problem = (device, dtype, n, k, tokens, bias, alpha_vector)
        info = self.plans[problem]  # the plan must exist
        assert size >= info["workspace"] and ws, "search workspace smaller than the plan's"
        self.searches.append((problem, size))
        if self.search_fails:
            raise StandInError("cusparseLtMatmulSearch failed: CUSPARSE_STATUS_EXECUTION_FAILED")
        alg, split = self.chosen
        info.update(alg_id=alg, split_k=split, split_k_mode=1, searched=True)
        info["workspace"] = self.chosen_workspace if self.chosen_workspace is not None else self.workspace_by_alg[alg]
        return dict(info)

    def matmul(self, device, dtype, n, k, tokens, bias, x, compressed, out, alpha_ptr, alpha, ws, size, s):
        problem = (device, dtype, n, k, tokens, bias, alpha_ptr != 0)
        info = self.plans[problem]  # no plan: KeyError, like the extension's "call plan() first"
        assert size >= info["workspace"], "workspace smaller than the plan's"
        ctypes.memset(out, 0, tokens * n * 2)  # fp16 output
        self.matmuls.append((problem, alpha_ptr, alpha))

    def clear_plans(self):
        self.plans.clear()
        self.cleared += 1


@pytest.fixture
def stand_in(monkeypatch):
    """Install a StandInC as armor_kernels._C with empty plan state; CPU tensors stand for GPU ones."""

    def install(**kw):
        fake = StandInC(**kw)
        monkeypatch.setattr(cuda_ext, "_C", fake)
        monkeypatch.setattr(cuda_ext, "_plans", {})
        monkeypatch.setattr(cuda_ext, "_searched", {})
        monkeypatch.setattr(cuda_ext, "_buffers", {})
        monkeypatch.setattr(cuda_ext, "_retired", [])
        monkeypatch.setattr(cuda_ext, "_stream", lambda device: 7)
        monkeypatch.setattr(cuda_ext, "_capturing", lambda: False)
        monkeypatch.delenv("ARMOR_CUSPARSELT_SEARCH", raising=False)
        return fake

    return install


def _core(bias=None):
    return cuda_ext.CompressedCore(torch.zeros(64, dtype=torch.uint8), N, K, torch.float16, bias)


def _x(tokens):
    return torch.randn(tokens, K).half()


def test_fresh_bias_and_alpha_per_call_make_no_new_plan(stand_in):
    fake = stand_in()
    core = _core()
    for _ in range(3):
        bias = torch.randn(N).half()  # a new tensor, a new address, every call
        out = cuda_ext.sparse24_mm(_x(24), core, bias)
        torch.testing.assert_close(out, bias.expand(24, N))  # the product is 0 here: out is the bias, added after
    for _ in range(3):
        cuda_ext.sparse24_mm(_x(24), core, None, torch.rand(N) + 0.5)
    problems = {p for p, _, _ in fake.plan_calls}
    assert len(problems) == 2  # scalar alpha and alpha vector; no bias address in either
    assert all(p[5] == 0 for p in problems)
    assert len(fake.matmuls) == 6 and len(fake.searches) == 2
    assert len({m[1] for m in fake.matmuls[3:]}) == 3  # each call passed its own alpha vector address


def test_the_cores_own_bias_is_fused_into_the_epilogue(stand_in):
    fake = stand_in()
    bias = torch.randn(N).half()
    core = _core(bias)
    for _ in range(3):
        out = cuda_ext.sparse24_mm(_x(16), core, bias)
    assert {p[5] for p, _, _ in fake.plan_calls} == {bias.data_ptr()}  # one plan, keyed by the core's bias
    assert torch.count_nonzero(out) == 0  # fused: not added a second time after the (stand-in) product


def test_a_searched_configuration_that_does_not_build_falls_back_to_the_default(stand_in):
    fake = stand_in(refuse=lambda tokens, alg_id, split_k: tokens == 104 and alg_id == 2)
    core = _core()
    cuda_ext.sparse24_mm(_x(120), core)  # bucket 128: search picks alg 2, split-K 2
    assert len(fake.searches) == 1
    out = cuda_ext.sparse24_mm(_x(100), core)  # padded to 104, same bucket: alg 2 does not build
    assert out.shape == (100, N)
    plans = {p["tokens"]: p for p in cuda_ext.cached_plans()}
    assert plans[120]["alg_id"] == 2 and plans[120]["searched"] and plans[120]["bucket"] == 128
    assert plans[104]["alg_id"] == 0 and "fallback" in plans[104] and "104 tokens" in plans[104]["fallback"]
    assert [(a, s) for p, a, s in fake.plan_calls if p[4] == 104] == [(2, 2), (-1, 1)]
    assert len(fake.searches) == 1  # the fallback does not search again
    cuda_ext.sparse24_mm(_x(112), core)  # another count of the bucket still gets the searched choice
    assert {p["tokens"]: p for p in cuda_ext.cached_plans()}[112]["alg_id"] == 2


def test_search_workspace_comes_from_cuSPARSELts_query(stand_in):
    fake = stand_in(workspace_by_alg={0: 1000, 1: 5 << 20, 2: 300, 4: 7000})  # id 3 does not build
    cuda_ext.sparse24_mm(_x(256), _core())
    assert [size for _, size in fake.searches] == [5 << 20]  # the largest any algorithm id needs
    assert not hasattr(cuda_ext, "SEARCH_WORKSPACE")
    assert cuda_ext.cached_plans()[0]["search_workspace"] == 5 << 20


def test_search_runs_again_when_the_choice_needs_more_than_it_had(stand_in):
    fake = stand_in(chosen_workspace=9 << 20)
    out = cuda_ext.sparse24_mm(_x(64), _core())
    assert [size for _, size in fake.searches] == [3 << 20, 9 << 20]
    assert out.shape == (64, N) and cuda_ext.workspace_bytes() >= 9 << 20  # matmul got a workspace that fits


def test_no_search_inside_a_graph_capture_then_search_after(stand_in, monkeypatch):
    fake = stand_in()
    core = _core()
    monkeypatch.setattr(cuda_ext, "_capturing", lambda: True)
    cuda_ext.sparse24_mm(_x(32), core)
    assert fake.searches == [] and cuda_ext.cached_plans()[0]["search_pending"]
    monkeypatch.setattr(cuda_ext, "_capturing", lambda: False)
    cuda_ext.sparse24_mm(_x(32), core)
    assert len(fake.searches) == 1 and cuda_ext.cached_plans()[0]["searched"]


def test_search_off_by_environment(stand_in, monkeypatch):
    fake = stand_in()
    monkeypatch.setenv("ARMOR_CUSPARSELT_SEARCH", "0")
    cuda_ext.sparse24_mm(_x(48), _core())
    assert fake.searches == [] and cuda_ext.cached_plans()[0]["alg_id"] == 0


def test_plans_are_bounded_and_remade_from_searched_choices(stand_in, monkeypatch):
    fake = stand_in()
    monkeypatch.setattr(cuda_ext, "MAX_PLANS", 3)
    core = _core()
    for tokens in (72, 80, 88, 96):  # one bucket (128), four plans
        cuda_ext.sparse24_mm(_x(tokens), core)
    assert fake.cleared == 1 and len(cuda_ext.cached_plans()) == 1
    assert len(fake.searches) == 1  # the bucket's choice survived the clear
    assert cuda_ext.cached_plans()[0]["alg_id"] == 2


def test_workspace_grows_geometrically_and_keeps_what_a_graph_may_use(stand_in):
    stand_in()
    small = cuda_ext._workspace(torch.device("cpu"), 7, 1 << 20)
    bigger = cuda_ext._workspace(torch.device("cpu"), 7, (1 << 20) + 1)
    assert bigger.numel() == 2 << 20 and cuda_ext._retired == [small]
    assert cuda_ext._workspace(torch.device("cpu"), 7, 100) is bigger


def test_a_failed_search_leaves_the_default_algorithm_once(stand_in):
    fake = stand_in(search_fails=True)
    core = _core()
    assert cuda_ext.sparse24_mm(_x(200), core).shape == (200, N)
    cuda_ext.sparse24_mm(_x(232), core)  # same bucket: not searched again
    assert len(fake.searches) == 1
    plans = cuda_ext.cached_plans()
    assert all(p["alg_id"] == 0 and not p.get("searched") for p in plans)
    assert "search failed" in plans[0]["fallback"]
