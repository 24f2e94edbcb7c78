"""Backend selection: forcing, disabling, caching per shape class, composites, the plan and `armor env`."""

import json

import pytest
import torch

from armor_kernels import dispatch, reference
from armor_kernels.backends.base import Backend
from tests.helpers import random_layer_weights


def make(bias=True):
    return random_layer_weights(32, 32, 16, 8, bias=bias)


def args(w, tokens=1):
    return torch.randn(tokens, 32), (w.a, w.values, w.meta, w.b, w.bias)


def test_cpu_picks_cpu_dense_then_reference_even_with_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, ws = args(make())
    assert dispatch.select("armor_linear", x, *ws).backend.name == "cpu_dense"
    # the other ops have no CPU layout: the reference runs them
    assert dispatch.select("sparse24_matmul", x, ws[1], ws[2], None).backend.name == "reference"
    for regime in dispatch.REGIME_TOKENS:
        row = dispatch.order("cpu", regime)
        assert row[:2] == ("cpu_dense", "reference") and row.index("triton") > 1
    monkeypatch.setenv("ARMOR_DISABLED_BACKENDS", "cpu_dense")
    dispatch.reset()
    assert dispatch.select("armor_linear", x, *ws).backend.name == "reference"


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


def _without_cpu_dense(names):
    return tuple(n for n in names if n != "cpu_dense")


@pytest.fixture
def counting(monkeypatch):
    """A new backend registered and put first in every CPU row of the selection table (without cpu_dense,
    which runs whole layers: these tests are about layers composed around a fast core)."""
    backend = CountingBackend()
    table = dict(dispatch._load())
    table[backend.name] = backend
    monkeypatch.setattr(dispatch, "_backends", table)
    rows = {r: ("counting", *_without_cpu_dense(names)) for r, names in dispatch.SELECTION["cpu"].items()}
    monkeypatch.setitem(dispatch.SELECTION, "cpu", rows)
    return backend


def test_a_registered_backend_outside_the_table_is_never_picked_automatically(monkeypatch):
    backend = CountingBackend()
    monkeypatch.setattr(dispatch, "_backends", {**dispatch._load(), backend.name: backend})
    w = make()
    assert dispatch.select("sparse24_matmul", torch.randn(2, 32), w.values, w.meta, None).backend.name == "reference"
    assert backend.asked == 0
    monkeypatch.setenv("ARMOR_BACKEND", "counting")  # forcing still works
    dispatch.reset()
    assert dispatch.select("sparse24_matmul", torch.randn(2, 32), w.values, w.meta, None).backend is backend


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
        assert ops == {"blockdiag_matmul": "reference", "sparse24_matmul": "reference", "armor_linear": "cpu_dense"}
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


def test_selection_table_is_complete_and_names_known_backends():
    modules = set(dispatch.BACKEND_MODULES)
    for device, rows in dispatch.SELECTION.items():
        assert set(rows) == set(dispatch.REGIME_TOKENS), device
        for regime, names in rows.items():
            assert "reference" in names, (device, regime)  # the oracle runs everything: in every row
            assert set(names) <= modules and len(set(names)) == len(names)
    assert dispatch.order("mps", "decode") == dispatch.order("cpu", "decode")  # no row: the CPU's


def test_gpu_regime_order_small_batch_kernel_first_extension_for_more_tokens():
    decode, medium, prefill = (dispatch.order("cuda", r) for r in ("decode", "medium", "prefill"))
    assert decode[0] == "triton" and "cuda_ext" not in decode
    assert medium == prefill and medium.index("cuda_ext") < medium.index("torch_sparse")
    assert medium.index("cuda_ext") < medium.index("triton")  # the core; triton runs the wrappers


def test_shared_checks_name_the_rule():
    from armor_kernels.backends.base import DECODE_MAX_TOKENS, HALF_DTYPES

    class Gpu24(Backend):
        name = "gpu24"
        ops = ("sparse24_matmul",)
        device_types = ("cuda",)
        min_capability = (8, 0)
        dtypes = HALF_DTYPES
        one_dtype = True
        max_tokens = {"sparse24_matmul": DECODE_MAX_TOKENS}  # noqa: RUF012 - a test class, never mutated

    w = make()
    b = Gpu24()
    assert b.can_implement("armor_linear", torch.randn(1, 32), w.values, w.meta) == (False, "gpu24 has no armor_linear")
    ok, why = b.can_implement("sparse24_matmul", torch.randn(1, 32), w.values, w.meta)
    assert not ok and why == "tensors on cpu: gpu24 needs CUDA"
    b.device_types = ("cpu",)
    ok, why = b.can_implement("sparse24_matmul", torch.randn(1, 32), w.values, w.meta)
    assert not ok and "dtype float32: gpu24 takes float16, bfloat16" in why
    ok, why = b.can_implement("sparse24_matmul", torch.randn(1, 32).half(), w.values.bfloat16(), w.meta)
    assert not ok and "one dtype" in why
    ok, why = b.can_implement("sparse24_matmul", torch.randn(17, 32).half(), w.values.half(), w.meta)
    assert not ok and why.startswith("17 tokens") and f"at most {DECODE_MAX_TOKENS}" in why
    assert b.can_implement("sparse24_matmul", torch.randn(2, 8, 32).half(), w.values.half(), w.meta) == (True, "")


def test_prepare_builds_only_what_the_layer_runs_and_frees_the_rest(monkeypatch):
    class Layout(CountingBackend):
        """A core backend holding one stand-in copy per layer, like cuSPARSELt's."""

        def __init__(self, name):
            super().__init__()
            self.name = name
            self.copies = {}

        def prepare(self, a, values, meta, b, bias):
            self.copies[id(values)] = torch.empty(values.numel() * 9 // 8, dtype=torch.uint8)

        def release(self, values=None):
            self.copies.clear() if values is None else self.copies.pop(id(values), None)

        def layout_bytes(self, values=None):
            return sum(t.nbytes for k, t in self.copies.items() if values is None or k == id(values))

    first, second = Layout("first"), Layout("second")
    monkeypatch.setattr(dispatch, "_backends", {**dispatch._load(), "first": first, "second": second})
    rows = {r: ("first", "second", *_without_cpu_dense(names)) for r, names in dispatch.SELECTION["cpu"].items()}
    monkeypatch.setitem(dispatch.SELECTION, "cpu", rows)
    w = make()
    held = dispatch.prepare(w.a, w.values, w.meta, w.b, w.bias)
    assert held == {"first": w.values.numel() * 9 // 8} and second.layout_bytes() == 0
    monkeypatch.setenv("ARMOR_DISABLED_BACKENDS", "first")  # a switch: the new choice builds, the old one frees
    dispatch.reset()
    held = dispatch.prepare(w.a, w.values, w.meta, w.b, w.bias)
    assert held == {"second": w.values.numel() * 9 // 8} and first.layout_bytes() == 0
    assert dispatch.report()["layout_bytes"] == held
    dispatch.release(w.values)
    assert dispatch.layout_bytes() == {}
