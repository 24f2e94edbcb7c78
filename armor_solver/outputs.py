"""Output directories: whether a path may be written, one lock per output, and a save that never loses data.

Every writer of a directory (``armor prune``, ``armor export``, ``checkpoint.save_pretrained``) enters
``claim(out, ...)`` and replaces the directory only through ``publish(out, build)``. Standard library only,
so the solver and the runtime can both import it.

``claim`` refuses, before anything is written:

- an empty path, the working directory or one of its parents;
- a path that is a source the command reads, holds one, or lies inside one;
- a file, or a path below a file;
- a non-empty directory, unless ``may_replace(path)`` accepts it (``armor prune``: an unfinished run with the
  same settings; ``save_pretrained``: an earlier checkpoint).

It holds ``.NAME.lock`` beside OUT with ``flock`` for the whole run (the kernel releases it if the process
dies), so a second run on the same OUT refuses at once, naming the holder's pid and command.

``publish`` writes into ``.NAME.tmp-PID``, renames it ``.NAME.new-PID`` once complete (the name says so), moves
OUT aside to ``.NAME.old-PID``, renames the new folder to OUT and removes the old one: each step is one rename
in one folder. After a crash at any step, the next ``claim`` (``recover``) finishes the save (a complete new
folder goes into place) or undoes it (the old folder comes back when nothing newer exists), and removes what
dead runs left. Under the lock no other run can be writing OUT, so every leftover found then is from a dead run.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the lock falls back to an exclusively created file
    fcntl = None


class OutputError(ValueError):
    """The output path may not be written as asked; nothing was touched."""


class OutputBusy(OutputError):
    """Another live process holds the output's lock."""


# files a Hugging Face checkpoint folder holds; anything else makes ``holds_checkpoint`` refuse the folder
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
    "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "chat_template.*", "*.model",
    "*.tiktoken", "preprocessor_config.json",
)
_KINDS = ("tmp", "new", "old")


def sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    """``.NAME.<kind>-PID`` beside ``out`` (kind: tmp, new, old)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


# ---- the decision ------------------------------------------------------------------
def holds_checkpoint(path: Path) -> str | None:
    """``may_replace`` for re-saving a checkpoint: None when ``path`` holds only checkpoint files, else why not."""
    entries = sorted(os.listdir(path))
    if "config.json" not in entries:
        return "it holds no config.json, so it is not a checkpoint"
    foreign = [e for e in entries if not (path / e).is_file() or not any(fnmatch.fnmatch(e, p) for p in CHECKPOINT_FILES)]
    if foreign:
        return f"besides a checkpoint it holds {', '.join(foreign[:5])}"
    return None


def _precheck(out, what: str, sources: Iterable) -> Path:
    """The refusals that need no lock: empty path, working directory, sources, files."""
    if out is None or not str(out).strip():
        raise OutputError(f"{what} is empty: name the directory to write")
    resolved = Path(out).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        raise OutputError(f"{what} {out}: is the working directory; writing it would replace everything in it")
    if resolved in cwd.parents:
        raise OutputError(f"{what} {out}: is a parent of the working directory ({cwd}); choose a new directory")
    for src in sources:
        if not src:
            continue
        s = Path(src).expanduser().resolve()
        if resolved == s or resolved in s.parents:
            raise OutputError(f"{what} {out}: {'is' if resolved == s else 'holds'} the source {s}; choose another {what}")
        if s in resolved.parents:
            raise OutputError(f"{what} {out}: lies inside the source {s}; choose a directory outside it")
    for p in (resolved, *resolved.parents):
        if p.exists():
            if not p.is_dir():
                if p == resolved:
                    raise OutputError(f"{what} {out}: is a file, not a directory")
                raise OutputError(f"{what} {out}: {p} is a file, so nothing can be written below it")
            break
    return resolved


def _check_contents(resolved: Path, out, what: str, may_replace, recovered: list[str]) -> None:
    if not resolved.is_dir():
        return
    entries = sorted(os.listdir(resolved))
    if not entries:
        return
    why = "it is not an unfinished run of this command" if may_replace is None else may_replace(resolved)
    if why:
        done = f" (after {'; '.join(recovered)})" if recovered else ""
        raise OutputError(
            f"{what} {out}: already holds files{done} ({', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}): "
            f"{why}; choose another {what} or remove it"
        )


# ---- the lock ----------------------------------------------------------------------
_held: dict[str, list] = {}  # lock path -> [fd, depth]: re-entrant within one process


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
        return f"pid {info.get('pid')}, `{info.get('command')}`, since {started}"
    except (OSError, ValueError):
        return "a process that has not written its name yet"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _acquire(path: Path) -> int:
    while True:
        if fcntl is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(json.loads(path.read_text(encoding="utf-8")).get("pid", 0))
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid):
                    raise OutputBusy(_holder(path)) from None
                path.unlink(missing_ok=True)  # the holder died
                continue
            return fd
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputBusy(_holder(path)) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the previous holder removed the file between our open and flock: take the new one


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``out`` (re-entrant in one process); raise ``OutputBusy`` naming the holder."""
    path = lock_path(out)
    key = str(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _acquire(path)
    except OutputBusy as e:
        raise OutputBusy(f"{out}: in use by another run ({e}); wait for it to finish or choose another output") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv)[:300], "started": time.time()}).encode())
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        if _held[key][1] == 1:
            del _held[key]
            with contextlib.suppress(OSError):
                path.unlink()  # while still holding it, so no waiter takes a file that is about to go
            os.close(fd)
        else:
            _held[key][1] -= 1


# ---- recovery and the save -----------------------------------------------------------
def _leftovers(out: Path) -> dict[str, list[Path]]:
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.({'|'.join(_KINDS)})-(\d+)$")
    found: dict[str, list[Path]] = {k: [] for k in _KINDS}
    if not out.parent.is_dir():
        return found
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir():
            found[m.group(1)].append(p)
    for paths in found.values():
        paths.sort(key=lambda p: p.stat().st_mtime)
    return found


def recover(out: Path) -> list[str]:
    """Finish or undo a save that a dead run left half done; remove its temporary folders. -> what was done.

    Call with the lock held (``claim`` does).
    """
    left = _leftovers(out)
    done = []
    for p in left["tmp"]:  # never complete: the save renames it once it is
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name}, the unfinished save of a dead run")
    if left["new"]:
        *stale, newest = left["new"]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        if out.exists():  # the run died before moving OUT aside
            aside = sibling(out, "old")
            os.replace(out, aside)
            left["old"].append(aside)
        os.replace(newest, out)
        done.append(f"completed the save that a dead run had finished writing ({newest.name} -> {out.name})")
        for p in left["old"]:
            shutil.rmtree(p, ignore_errors=True)
    elif left["old"]:
        *stale, newest = left["old"]
        if not out.exists():  # nothing newer took its place: give the user back what they had
            os.replace(newest, out)
            done.append(f"restored {out.name} from {newest.name}, left by a dead run")
        else:
            stale.append(newest)  # the save had completed; only its cleanup was missing
            done.append(f"removed {newest.name}, the previous contents replaced by a completed save")
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
    return done


def write_file_atomically(path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` over ``path``: a crash leaves the old file or the new one, never half of one.

    The temporary name is ``path + ".tmp"``; a dead run's leftover is overwritten by the next write.
    """
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def publish(out, build: Callable[[Path], None]) -> Path:
    """Write a new ``out`` with ``build(tmp)``; the old contents go only once the new ones are complete."""
    out = Path(out).resolve()
    with lock(out):
        tmp = sibling(out, "tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
            new = sibling(out, "new")
            shutil.rmtree(new, ignore_errors=True)
            os.replace(tmp, new)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = None
        if out.exists():
            old = sibling(out, "old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        try:
            os.replace(new, out)
        except BaseException:
            if old is not None and not out.exists():
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # a failure here loses nothing; the next claim removes it
    return out


@dataclass
class Claim:
    path: Path  # resolved
    recovered: list[str] = field(default_factory=list)  # what ``recover`` did


@contextlib.contextmanager
def claim(out, *, what: str = "--out", sources: Iterable = (), may_replace=None) -> Iterator[Claim]:
    """Check that ``out`` may be written, lock it, recover what dead runs left, and hold the lock until exit.

    ``sources``: paths the command reads (never written, never inside the output). ``may_replace(path) ->
    None | str``: for a non-empty directory, None accepts it, a string says why it is refused (it may also
    raise its own error). Raises ``OutputError`` (``OutputBusy`` for a locked output).
    """
    sources = list(sources)
    resolved = _precheck(out, what, sources)
    with lock(resolved):
        recovered = recover(resolved)
        _check_contents(resolved, out, what, may_replace, recovered)
        yield Claim(resolved, recovered)
