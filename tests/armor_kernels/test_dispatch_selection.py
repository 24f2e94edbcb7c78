"""Backend selection: forcing, disabling, caching per shape class, composites, the plan and `armor env`."""

import json

import pytest
import torch

from armor_kernels import ArmorWeights, dispatch, reference, sparse24
from armor_kernels.backends.base import Backend


def make(bias=True):
    core = torch.randn(32, 32)
    mask = sparse24.topk_mask(core.abs())
    return ArmorWeights.from_factors(
        torch.randn(2, 16, 16), torch.where(mask, core, 0.0), torch.randn(4, 8, 8),
        bias=torch.randn(32) if bias else None, mask=mask,
    )  # fmt: skip


def args(w, tokens=1):
    return torch.randn(tokens, 32), (w.a, w.values, w.meta, w.b, w.bias)


def test_cpu_picks_reference_even_with_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, ws = args(make())
    choice = dispatch.select("armor_linear", x, *ws)
    assert choice.backend.name == "reference"
    if "triton" in dispatch.report()["backends"]:
        assert dispatch.rank(dispatch.get("triton"), "cpu", "decode") < dispatch.rank(
            dispatch.get("reference"), "cpu", "decode"
        )


def test_forced_backend_that_cannot_run_raises_its_reason(monkeypatch):
    x, ws = args(make())
    monkeypatch.setenv("ARMOR_BACKEND", "torch_sparse")
    with pytest.raises(
        dispatch.BackendUnavailable, match="ARMOR_BACKEND=torch_sparse cannot run armor_linear: .*(CUDA|cuSPARSELt)"
    ):
        dispatch.select("armor_linear", x, *ws)
    monkeypatch.setenv("ARMOR_BACKEND", "no_such_backend")
    dispatch.reset()
    with pytest.raises(dispatch.BackendUnavailable, match="not loaded"):
        dispatch.select("armor_linear", x, *ws)


def test_forced_triton_without_interpreter_on_cpu_says_why(monkeypatch):
    if "triton" not in dispatch.report()["backends"]:
        pytest.skip(f"triton backend not loaded: {dispatch.report()['load_errors'].get('triton')}")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ARMOR_BACKEND", "triton")
    x, ws = args(make())
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton is available")
    with pytest.raises(dispatch.BackendUnavailable, match="TRITON_INTERPRET"):
        dispatch.select("armor_linear", x, *ws)


def test_forced_triton_rejects_prefill_token_counts(monkeypatch):
    if "triton" not in dispatch.report()["backends"]:
        pytest.skip("triton backend not loaded")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ARMOR_BACKEND", "triton")
    x, ws = args(make(), tokens=64)
    with pytest.raises(dispatch.BackendUnavailable, match="64 tokens"):
        dispatch.select("sparse24_matmul", x, ws[1], ws[2], None)


def test_disabled_backends_are_skipped_with_a_reason(monkeypatch):
    if "triton" not in dispatch.report()["backends"]:
        pytest.skip("triton backend not loaded")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ARMOR_DISABLED_BACKENDS", "reference, torch_sparse")
    x, ws = args(make())
    choice = dispatch.select("blockdiag_matmul", x, ws[3], None)
    assert choice.backend.name == "triton"
    assert choice.reasons["reference"] == "disabled by ARMOR_DISABLED_BACKENDS"
    monkeypatch.setenv("ARMOR_DISABLED_BACKENDS", "reference,triton")
    dispatch.reset()
    with pytest.raises(dispatch.BackendUnavailable, match="disabled"):
        dispatch.select("blockdiag_matmul", x, ws[3], None)


class CountingBackend(Backend):
    """Runs the 2:4 core only (like cuSPARSELt), counts how often it is asked."""

    name = "counting"
    priority = 50
    ops = ("sparse24_matmul",)

    def __init__(self):
        self.asked = 0
        self.ran = 0

    def can_implement(self, op, x, *weights):
        self.asked += 1
        return super().can_implement(op, x, *weights)

    def sparse24_matmul(self, x, values, meta, bias=None):
        self.ran += 1
        return reference.sparse24_matmul(x, values, meta, bias)


@pytest.fixture
def counting(monkeypatch):
    backend = CountingBackend()
    table = dict(dispatch._load())
    table[backend.name] = backend
    monkeypatch.setattr(dispatch, "_backends", table)
    return backend


def test_decision_is_made_once_per_shape_class(counting):
    w = make()
    for tokens in (1, 3, 16, 1, 5):  # one decode class
        dispatch.run("sparse24_matmul", torch.randn(tokens, 32), w.values, w.meta, None)
    assert counting.asked == 1 and counting.ran == 5
    dispatch.run("sparse24_matmul", torch.randn(17, 32), w.values, w.meta, None)  # medium: a new class
    assert counting.asked == 2
    dispatch.run("sparse24_matmul", torch.randn(2, 32, dtype=torch.float64), w.values.double(), w.meta, None)
    assert counting.asked == 3  # a new dtype is a new class


def test_armor_linear_is_composed_when_only_the_core_is_fast(counting):
    w = make()
    x = torch.randn(2, 3, 32)
    choice = dispatch.select("armor_linear", x, w.a, w.values, w.meta, w.b, w.bias)
    assert choice.backend.name == "composite(reference>counting>reference)"
    got = dispatch.run("armor_linear", x, w.a, w.values, w.meta, w.b, w.bias)
    torch.testing.assert_close(got, reference.armor_linear(x, w.a, w.values, w.meta, w.b, w.bias))
    assert counting.ran == 1


def test_forced_core_backend_gets_automatic_wrappers(counting, monkeypatch):
    monkeypatch.setenv("ARMOR_BACKEND", "counting")
    w = make(bias=False)
    x = torch.randn(4, 32)
    got = dispatch.run("armor_linear", x, w.a, w.values, w.meta, w.b, None)
    torch.testing.assert_close(got, reference.armor_linear(x, w.a, w.values, w.meta, w.b))
    assert counting.ran == 1
    with pytest.raises(dispatch.BackendUnavailable, match="counting has no blockdiag_matmul"):
        dispatch.run("blockdiag_matmul", x, w.b, None)


def test_plan_covers_every_regime_and_op():
    plan = dispatch.plan("cpu", torch.bfloat16, 64, 64, 32)
    assert set(plan) == {"decode", "medium", "prefill"}
    for ops in plan.values():
        assert ops == {"blockdiag_matmul": "reference", "sparse24_matmul": "reference", "armor_linear": "reference"}
    assert not dispatch._cache, "plan must not fill the cache"


def test_armor_env_prints_versions_backends_plan_and_choices(capsys):
    from armor_runtime import cli

    w = make()
    dispatch.run("armor_linear", torch.randn(1, 32), w.a, w.values, w.meta, w.b, w.bias)
    assert cli.main(["env", "--shape", "64", "64", "32"]) == 0
    text = capsys.readouterr().out
    for word in ("torch", "triton", "transformers", "reference", "torch_sparse", "decode", "prefill", "bfloat16"):
        assert word in text
    assert "armor_linear cpu float32 decode" in text  # the cached choice
    assert "unavailable: no CUDA GPU" in text or torch.cuda.is_available()
    assert cli.main(["env", "--json", "--shape", "64", "64", "32"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"]["available"] is True
    assert info["plan"]["by_dtype"]["float16"]["prefill"]["armor_linear"]


def test_gpu_regime_order_small_batch_kernel_first_extension_for_more_tokens():
    table = dispatch._load()
    if "triton" not in table:
        pytest.skip("triton backend not loaded")
    triton = table["triton"]
    assert dispatch.rank(triton, "cuda", "decode") > dispatch.rank(table["reference"], "cuda", "decode")
    for other in ("cuda_ext", "torch_sparse"):
        if other in table:
            assert dispatch.rank(triton, "cuda", "decode") > dispatch.rank(table[other], "cuda", "decode")
    if "cuda_ext" in table:
        for regime in ("medium", "prefill"):
            assert dispatch.rank(table["cuda_ext"], "cuda", regime) > dispatch.rank(triton, "cuda", regime)
