"""benchmarks/gpu_suite.sh: its time budget (parsed from the script) and a CPU dry run of its plumbing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from benchmarks import common

SCRIPT = common.REPO / "benchmarks" / "gpu_suite.sh"
LIMIT_S = 390  # 6.5 minutes of the GPU window
FIRST_STEPS = ["env", "build", "check_triton", "check_cuda", "kernels", "e2e"]  # in order of value


def _steps() -> list[tuple[str, int]]:
    return [(m[1], int(m[2])) for m in re.finditer(r"^step\s+(\S+)\s+(\d+)\s", SCRIPT.read_text(), re.MULTILINE)]


def test_budgets_fit_the_window_in_order_of_value():
    steps = _steps()
    assert [name for name, _ in steps][: len(FIRST_STEPS)] == FIRST_STEPS
    assert sum(b for _, b in steps) <= LIMIT_S
    assert re.search(r"^TOTAL=\$\{SUITE_SECONDS:-(\d+)\}", SCRIPT.read_text(), re.MULTILINE)[1] == str(LIMIT_S)
    # the header's table states the same budgets as the step lines
    header = dict(re.findall(r"^#\s{3}(\w+)\s+(\d+)\s", SCRIPT.read_text(), re.MULTILINE))
    assert header == {name: str(b) for name, b in steps}


def test_script_keeps_its_rules():
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert "set -u" in text and "PYTHONUNBUFFERED=1" in text and "timeout -k" in text
    assert "PIP_NO_INDEX=1" in text and "pip install" not in text  # never installs from the network
    assert "ARMOR_COMMIT" in text


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and timeout")
    out = tmp_path_factory.mktemp("suite") / "out"
    env = dict(os.environ, SUITE_SMOKE="1", PY=sys.executable, ARMOR_COMMIT="c0ffee12",
               GIT_DIR=str(out / "no-git-here"), PYTHONPATH=str(common.REPO))  # fmt: skip
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    return run, out


def test_dry_run_passes_and_prints_the_summary_last(dry_run):
    run, out = dry_run
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert run.stdout.rstrip().endswith(summary.rstrip())
    rows = [line.split() for line in summary.splitlines()[1:] if line and line.split()[0] in dict(_steps())]
    assert [r[0] for r in rows] == [name for name, _ in _steps()]
    assert all(r[1] == "0" and r[-1] == "ok" for r in rows), summary


def test_dry_run_output_fits_the_rules(dry_run):
    _, out = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8
    assert all(len(p.relative_to(out).parts) <= 3 for p in files)  # at most 2 folders deep
    assert all(p.stat().st_size < 16 << 20 for p in files)
    assert {"summary.txt", "suite.log", "env.txt", "kernels.csv", "e2e.csv"} <= {p.name for p in files}


def test_dry_run_names_the_commit_without_git(dry_run):
    _, out = dry_run
    assert "c0ffee12 (ARMOR_COMMIT" in (out / "env.txt").read_text()
    for csv_name in ("kernels.csv", "e2e.csv"):
        rows = common.read_csv(out / csv_name)
        assert rows and {r["commit"] for r in rows} == {"c0ffee12"}


def test_launch_cost_refuses_without_a_gpu(capsys):
    from benchmarks import launch_cost

    if launch_cost.torch.cuda.is_available():
        pytest.skip("a GPU is present: the suite's launch step measures it")
    assert launch_cost.main(["--out", os.devnull]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
