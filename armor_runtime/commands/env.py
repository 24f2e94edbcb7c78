"""``armor env``: versions, backends (available or why not), the backend per regime and dtype, cached plans."""

from __future__ import annotations

import importlib.metadata
import json
import platform

DTYPE_NAMES = ("bfloat16", "float16", "float32")
ENV_VARS = (
    "ARMOR_BACKEND",
    "ARMOR_DISABLED_BACKENDS",
    "ARMOR_CUSPARSELT_LAYOUT",
    "ARMOR_CUSPARSELT_SEARCH",
    "TRITON_INTERPRET",
)


def add_arguments(parser) -> None:
    parser.add_argument("--device", default=None, help="device to plan for (default: cuda if present, else cpu)")
    parser.add_argument(
        "--shape", type=int, nargs=3, default=(4096, 4096, 128), metavar=("D_OUT", "D_IN", "BLOCK"),
        help="layer shape the per-regime plan is made for (default: 4096 4096 128)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect(device: str | None = None, shape=(4096, 4096, 128)) -> dict:
    """Everything ``armor env`` prints, as a dict."""
    import os

    import torch

    from armor_kernels import dispatch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda (torch built with)": torch.version.cuda or "none (CPU build)",
        "gpus": [],
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                f"{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
            )
    cusparselt = getattr(torch.backends, "cusparselt", None)
    info["cusparselt"] = (
        str(cusparselt.version()) if cusparselt is not None and cusparselt.is_available() else "not available"
    )
    report = dispatch.report()
    for key in ("selection", "backends", "load_errors", "cusparselt_layout", "layout_bytes", "workspace_bytes"):
        info[key] = report[key]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    d_out, d_in, block = shape
    info["plan"] = {"device": device, "shape": f"{d_out}x{d_in}, block {block}", "by_dtype": {}}
    for name in DTYPE_NAMES:
        info["plan"]["by_dtype"][name] = dispatch.plan(device, getattr(torch, name), d_out, d_in, block)
    info["choices"] = report["choices"]
    info["passed_over"] = report["passed_over"]
    plans = {}
    for backend in dispatch.backends():
        if callable(getattr(backend, "plans", None)):
            plans[backend.name] = backend.plans()
    info["backend_plans"] = plans
    return info


def _print_text(info: dict) -> None:
    for key in ("python", "platform", "torch", "triton", "transformers", "cuda (torch built with)", "cusparselt"):
        print(f"{key:24s} {info[key]}")
    print(f"{'gpus':24s} {'; '.join(info['gpus']) or 'none'}")
    for k, v in info["env"].items():
        print(f"{k:24s} {v}")
    print("\nbackends")
    for name, st in info["backends"].items():
        state = "available" if st["available"] else f"unavailable: {st['reason']}"
        print(f"  {name:14s} {state}")
    for mod, err in info["load_errors"].items():
        print(f"  {mod:14s} not loaded: {err}")
    print("\nselection order (first available that can run the op wins; armor_kernels.dispatch.SELECTION)")
    for device, rows in info["selection"].items():
        for regime, names in rows.items():
            print(f"  {device:5s} {regime:8s} {' > '.join(names)}")
    layout = "on: layers may hold cuSPARSELt's compressed copy" if info["cusparselt_layout"] else "off"
    print(f"\nsecond copy of each 2:4 core (ARMOR_CUSPARSELT_LAYOUT=1): {layout}")
    held = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in info["layout_bytes"].items()) or "none"
    shared = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in info["workspace_bytes"].items()) or "none"
    print(f"  layouts held by backends: {held}; shared workspaces: {shared}")
    plan = info["plan"]
    print(f"\nplan on {plan['device']} for a {plan['shape']} layer (tokens: decode 1, medium 64, prefill 1024)")
    for dtype, regimes in plan["by_dtype"].items():
        print(f"  {dtype}")
        for regime, ops in regimes.items():
            row = ", ".join(f"{op}={name}" for op, name in ops.items())
            print(f"    {regime:8s} {row}")
    print("\ncached choices" + ("" if info["choices"] else ": none yet (made on the first call of each shape class)"))
    for key, name in info["choices"].items():
        print(f"  {key} -> {name}")
        for other, why in info["passed_over"].get(key, {}).items():
            print(f"      passed over {other}: {why}")
    for backend, plans in info["backend_plans"].items():
        print(f"\n{backend} plans" + ("" if plans else ": none yet"))
        for key, how in plans.items():
            print(f"  {key}: {how}")


def run(args) -> int:
    from ._common import check_device

    if args.device is not None:
        check_device(args.device)
    info = collect(args.device, tuple(args.shape))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_text(info)
    return 0
