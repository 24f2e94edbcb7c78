"""benchmarks/check_triton_gpu.py: its cases pass on a small layer (interpreter on CPU), and it exits 2 without a GPU."""

import pytest
import torch

check = pytest.importorskip("benchmarks.check_triton_gpu")
tb = pytest.importorskip("armor_kernels.backends.triton")
if tb.IMPORT_ERROR:
    pytest.skip(f"triton unavailable: {tb.IMPORT_ERROR}", allow_module_level=True)


def test_every_case_passes_on_a_small_layer():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = check.make_layer(64, 48, 32, 12, torch.bfloat16, device)
    x = torch.randn(3, 48, device=device).to(torch.bfloat16)
    names = []
    for name, fn, exact, same in check.cases(w, x):
        err, allowed, ok = check.judge(fn(), exact, same, torch.bfloat16)
        assert ok, f"{name}: {err} > {allowed}"
        names.append(name)
    assert {"blockdiag B", "sparse24 +A+bias", "decode_layer"} <= set(names)


def test_judge_flags_a_wrong_result():
    exact = torch.randn(4, 8, dtype=torch.float64)
    same = exact.to(torch.bfloat16)
    assert check.judge(same, exact, same, torch.bfloat16)[2]
    assert not check.judge((exact * 1.1).to(torch.bfloat16), exact, same, torch.bfloat16)[2]


def test_exits_2_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert check.main(["--quick"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
