"""armor_solver.outputs: which output paths may be written, the lock, and a save that survives a crash at any step."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from armor_solver import outputs
from armor_solver.outputs import OutputBusy, OutputError, claim, publish

REPO = Path(__file__).resolve().parents[2]


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _write(path: Path, files: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)


def _claim(out, **kw):
    with claim(out, **kw) as c:
        return c


def test_refuses_empty_cwd_and_its_parents(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path / "work")
    for out, match in [("", "is empty"), ("  ", "is empty"), (".", "is the working directory"),
                       (str(tmp_path / "work"), "is the working directory"), ("..", "parent of the working directory"),
                       ("/", "parent of the working directory")]:
        with pytest.raises(OutputError, match=match):
            _claim(out)
    assert (tmp_path / "work" / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # no lock file, nothing written


def test_refuses_sources_files_and_foreign_dirs(tmp_path):
    src = tmp_path / "model"
    _write(src, {"config.json": "{}"})
    for out, match in [(src, "is the source"), (tmp_path, "holds the source"), (src / "sub", "lies inside the source")]:
        with pytest.raises(OutputError, match=match):
            _claim(out, sources=[src])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        _claim(tmp_path / "file.txt")
    with pytest.raises(OutputError, match=r"file\.txt is a file, so nothing can be written below it"):
        _claim(tmp_path / "file.txt" / "a" / "b")
    foreign = tmp_path / "foreign"
    _write(foreign, {"notes.txt": "mine"})
    with pytest.raises(OutputError, match=r"already holds files \(notes\.txt\)"):
        _claim(foreign)
    with pytest.raises(OutputError, match="it holds no config.json, so it is not a checkpoint"):
        _claim(foreign, may_replace=outputs.holds_checkpoint)
    (foreign / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="besides a checkpoint it holds notes.txt"):
        _claim(foreign, may_replace=outputs.holds_checkpoint)
    assert _tree(foreign) == {"config.json": "{}", "notes.txt": "mine"}
    # accepted: new, empty, or what may_replace accepts
    assert _claim(tmp_path / "new" / "deeper").path == (tmp_path / "new" / "deeper").resolve()
    (tmp_path / "empty").mkdir()
    _claim(tmp_path / "empty")
    ckpt = tmp_path / "ckpt"
    _write(ckpt, {"config.json": "{}", "model.safetensors": "", "tokenizer.json": "{}"})
    _claim(ckpt, may_replace=outputs.holds_checkpoint)
    assert not list(tmp_path.glob(".*.lock"))  # released and removed


HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from armor_solver import outputs
    with outputs.claim(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_second_run_refused_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with pytest.raises(OutputBusy, match=rf"in use by another run \(pid {holder.pid}, "):
            _claim(out)
        assert time.perf_counter() - t0 < 5  # refused at once, no waiting
        holder.kill()  # like kill -9: the kernel releases the lock
        holder.wait(timeout=30)
        _claim(out)  # a dead holder never blocks the next run
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_claim_is_reentrant_in_one_process(tmp_path):
    out = tmp_path / "out"
    with claim(out), claim(out), claim(out):
        assert outputs.lock_path(out.resolve()).exists()
    assert not outputs.lock_path(out.resolve()).exists()


def test_publish_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    _write(out, {"a.txt": "old"})

    def broken(tmp):
        _write(tmp, {"a.txt": "new"})
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        publish(out, broken)
    assert _tree(out) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    publish(out, lambda tmp: _write(tmp, {"b.txt": "new"}))
    assert _tree(out) == {"b.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# A child process runs publish() and dies (os._exit, as kill -9 would) at one point of the save.
CRASH = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    from armor_solver import outputs
    out, point = Path(sys.argv[1]), sys.argv[2]
    real_replace, real_rmtree = os.replace, shutil.rmtree
    def replace(src, dst):
        kind = Path(src).name.rsplit(".", 1)[-1].split("-")[0]   # tmp, new, or the name of OUT
        step = {"tmp": "before-new", "new": "before-swap"}.get(kind, "before-aside")
        if step == point:
            os._exit(9)
        real_replace(src, dst)
        if step == "before-swap" and point == "after-swap":
            os._exit(9)
    outputs.os.replace = replace
    def build(tmp):
        tmp.mkdir()
        (tmp / "a.txt").write_text("new")
        if point == "in-build":
            os._exit(9)
        (tmp / "b.txt").write_text("new")
    outputs.publish(out, build)
""")
# (crash point, what OUT holds after the next claim recovers)
POINTS = [("in-build", "old"), ("before-new", "old"), ("before-aside", "new"), ("before-swap", "new"),
          ("after-swap", "new")]


@pytest.mark.parametrize("point,expected", POINTS)
def test_crash_at_any_point_of_the_save_is_finished_or_undone(tmp_path, point, expected):
    out = tmp_path / "out"
    _write(out, {"a.txt": "old", "c.txt": "old"})
    run = subprocess.run([sys.executable, "-c", CRASH, str(out), point], check=False, env=_env(), timeout=60,
                         capture_output=True, text=True)
    assert run.returncode == 9, run.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left != ["out"]  # the crash really left something behind
    if point == "before-swap":
        assert not out.exists()  # the dangerous moment: OUT moved aside, the new one not yet in place
    c = _claim(out, may_replace=lambda path: None)
    assert c.recovered, "recovery did nothing"
    want = {"a.txt": "old", "c.txt": "old"} if expected == "old" else {"a.txt": "new", "b.txt": "new"}
    assert _tree(out) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # every leftover of the dead run removed


def test_old_copy_comes_back_when_nothing_newer_exists(tmp_path):
    out = tmp_path / "out"
    aside = outputs.sibling(out, "old", pid=12345)
    _write(aside, {"a.txt": "old"})
    c = _claim(out, may_replace=lambda path: None)
    assert "restored" in c.recovered[0]
    assert _tree(out) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
