"""Dependencies point one way: armor_kernels <- armor_solver <- armor_runtime <- (CLI commands, benchmarks).

Every import of every module, at top level or inside a function, is read from its source (``ast``), so a
lazy import that runs the wrong way fails here too.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"armor_kernels": 0, "armor_solver": 1, "armor_runtime": 2, "benchmarks": 3}


def _imports(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, a module of ``package``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((node.lineno, base))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                found.append((node.lineno, str(arg.values[0].value).rstrip(".")))
    return found


def _modules():
    return sorted(p for top in LAYER for p in (ROOT / top).rglob("*.py"))


def test_the_rule_reads_every_package():
    assert len(_modules()) > 60


def _imports_of(path: Path) -> list[tuple[int, str]]:
    return _imports(path.read_text(encoding="utf-8"), ".".join(path.relative_to(ROOT).parts[:-1]))


def test_imports_point_down():
    wrong = []
    for path in _modules():
        own = LAYER[path.relative_to(ROOT).parts[0]]
        wrong += [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in _imports_of(path)
                  if name.split(".")[0] in LAYER and LAYER[name.split(".")[0]] > own]
    assert not wrong, "imports of a layer above the module's own:\n" + "\n".join(wrong)


def test_the_rule_sees_lazy_relative_and_dynamic_imports():
    source = ("from . import calibration\nfrom ..kernels import x\n\ndef f():\n    from armor_runtime import checkpoint\n"
              "    importlib.import_module('benchmarks.common')\n    importlib.import_module(f'armor_runtime.{name}')\n")
    names = [name for _, name in _imports(source, "armor_solver.methods")]
    assert names == ["armor_solver.methods", "armor_solver.kernels", "armor_runtime", "benchmarks.common", "armor_runtime"]


def test_heavy_frameworks_stay_where_they_belong():
    """transformers never in armor_kernels; vllm only in the plugin (armor_runtime/vllm) and the benchmarks."""
    wrong = []
    for path in _modules():
        rel = path.relative_to(ROOT)
        names = {name.split(".")[0] for _, name in _imports_of(path)}
        if rel.parts[0] == "armor_kernels" and "transformers" in names:
            wrong.append(f"{rel} imports transformers")
        if "vllm" in names and rel.parts[0] != "benchmarks" and rel.parts[:2] != ("armor_runtime", "vllm"):
            wrong.append(f"{rel} imports vllm outside the plugin")
    assert not wrong, "\n".join(wrong)
