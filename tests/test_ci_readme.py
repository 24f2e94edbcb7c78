"""CI runs the README's first two commands as written: .ci/run reads them from the README."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def readme_commands():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.readme_commands


def test_readme_starts_with_the_demo_and_test_commands(readme_commands):
    text = (ROOT / "README.md").read_text()
    assert text.lstrip().startswith("# "), "README.md starts with its title"
    assert readme_commands(text) == ["make demo", "make test"]


def test_ci_runs_the_commands_it_reads_from_the_readme():
    run = (ROOT / ".ci" / "run").read_text()
    assert "python3 .ci/readme_commands.py" in run and 'bash -c "$cmd"' in run
    # nothing is installed before the README's commands but the fresh venv itself
    before = run.split("mapfile -t commands")[0]
    assert "pip install" not in before and "python3 -m venv" in before


def test_extraction_strips_comments_and_blank_lines(readme_commands):
    text = "# T\n\n```bash\nmake a   # first\n\n  make b\n```\n\n```bash\nnot this\n```\n"
    assert readme_commands(text) == ["make a", "make b"]
    with pytest.raises(ValueError, match="no code block"):
        readme_commands("no block here")
