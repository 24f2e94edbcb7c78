"""End-to-end benchmark: prefill and decode tokens/s, peak and resident memory, weight and disk
bytes, for one model run dense, as plain 2:4 and as ARMOR (with and without cuSPARSELt's copy).

    python -m benchmarks.bench_e2e --models llama3-8b-shaped,smollm2-135m --out e2e.csv
    python -m benchmarks.bench_e2e --smoke              # CPU harness check in seconds

Models (``benchmarks/e2e/models.py``): ``llama3-8b-shaped`` (Llama-3-8B config, random
weights; ``--layers`` to use fewer layers, written in each row), ``smollm2-135m`` (the
bundled GGUF; when it or the ``gguf`` package is missing, a row says so and a random model
of its shape runs instead), ``tiny`` (smoke only).

Variants (``benchmarks/e2e/variants.py``): ``dense``; ``plain24`` (magnitude 2:4, PyTorch's
cuSPARSELt through ``armor_kernels.backends.torch_sparse``); ``armor`` (``ArmorLinear`` with
random factors and a valid 2:4 core, one copy of each core); ``armor_cslt`` (the same with
``ARMOR_CUSPARSELT_LAYOUT=1``: cuSPARSELt's compressed copy of each core kept for prefill).

Phases, one row each: ``weights`` (bytes held by the model, bytes the backends hold in
layouts, resident GPU memory), ``prefill`` (batch 1, ``--prefill`` tokens, logits of the
last position only), ``decode`` (``--decode-batches``, ``--new-tokens`` greedy steps after a
``--prompt``-token prompt; ``benchmarks/e2e/decode.py``), ``disk`` (``save_pretrained``).
On CPU the ARMOR rows run `cpu_dense` (W_hat multiplied out once, "armor_linear via cpu_dense").
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import common
from benchmarks.common import Unavailable
from benchmarks.e2e import decode, measure, models, variants

COLUMNS = common.ENV_COLUMNS + [
    "transformers", "model", "source", "n_layers", "layers_note", "variant", "impl", "dtype", "phase", "tokens",
    "batch", "new_tokens", "decode_mode", "status", "reason", "seconds", "tokens_per_s", "peak_mem_gib",
    "resident_gib", "weights_bytes", "layout_bytes", "disk_bytes", "speedup_vs_dense", "bytes_vs_dense", "note",
]  # fmt: skip


def weights_row(model, variant: str, device) -> dict:
    """Bytes of the model's own tensors, of the backends' extra layouts, and resident GPU memory."""
    from armor_kernels import dispatch

    layouts = sum(dispatch.layout_bytes().values()) if variant.startswith("armor") else 0
    return dict(measure.resident(device), weights_bytes=models.model_bytes(model), layout_bytes=layouts)


def points(args, device) -> list[dict]:
    """The measurement points of one variant, in order: decode, prefill, disk."""
    pts = []
    for bsz in args.decode_batches:
        for mode in args.decode_modes:
            key = {"phase": "decode", "tokens": args.prompt, "batch": bsz, "new_tokens": args.new_tokens,
                   "decode_mode": mode}  # fmt: skip
            pts.append({"key": key, "fn": lambda m, bsz=bsz, mode=mode: decode.decode(
                m, bsz, mode, args.prompt, args.new_tokens, device, args.reps)})  # fmt: skip
    for t in args.prefill:
        pts.append({"key": {"phase": "prefill", "tokens": t, "batch": 1},
                    "fn": lambda m, t=t: measure.measure_prefill(m, t, device, args.reps)})  # fmt: skip
    if args.disk:
        pts.append({"key": {"phase": "disk"}, "fn": lambda m: disk(m, args)})
    return pts


def disk(model, args) -> dict:
    wb = models.model_bytes(model)
    if args.disk_max_gb is not None and wb > args.disk_max_gb * 2**30:
        raise Unavailable(
            f"not saved: {wb / 2**30:.1f} GiB of weights is above --disk-max-gb {args.disk_max_gb} (time box)"
        )
    return measure.measure_disk(model, variants.current_variant(model), args.scratch)


def with_ratios(row: dict, ref: dict | None) -> dict:
    """Speedup and bytes against dense's row of the same point."""
    if not ref or row.get("status") != "ok":
        return row
    if "tokens_per_s" in row and ref.get("tokens_per_s"):
        row["speedup_vs_dense"] = row["tokens_per_s"] / ref["tokens_per_s"]
        if "peak_mem_gib" in row and ref.get("peak_mem_gib"):
            row["bytes_vs_dense"] = row["peak_mem_gib"] / ref["peak_mem_gib"]
    if "disk_bytes" in row and ref.get("disk_bytes"):
        row["bytes_vs_dense"] = row["disk_bytes"] / ref["disk_bytes"]
    if "weights_bytes" in row and ref.get("weights_bytes"):
        row["bytes_vs_dense"] = (row["weights_bytes"] + row.get("layout_bytes", 0)) / ref["weights_bytes"]
    return row


def run_variant(model, variant: str, dense_layers, args, device, vbase: dict, dense_ref: dict, write) -> None:
    """Build one variant from the dense model, write its rows, and put the dense layers back."""
    with variants.variant_environment(variant):
        try:
            impl = variants.apply_variant(model, variant, args.block_size, dense_layers)
        except Exception as e:  # noqa: BLE001 - an arm that cannot be built is a row
            status = "unavailable" if isinstance(e, Unavailable) else "error"
            write(dict(vbase, phase="weights", status=status, reason=common.reason(e)))
            variants.apply_variant(model, "dense", args.block_size, dense_layers)
            return
        if variant != "dense":  # park the dense layers off the GPU so memory is the variant's own
            for lin in dense_layers.values():
                lin.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        vbase = dict(vbase, impl=impl)
        row = dict(vbase, phase="weights", status="ok", **weights_row(model, variant, device))
        if variant == "dense":
            dense_ref[("weights",)] = row
        write(with_ratios(row, dense_ref.get(("weights",))))
        for point in points(args, device):
            row = dict(vbase, **point["key"])
            try:
                row.update(point["fn"](model), status="ok")
                if variant.startswith("armor"):
                    row["impl"] = variants.armor_impl_label(device)
            except Exception as e:  # noqa: BLE001 - one failing point never ends the run
                row.update(status="unavailable" if isinstance(e, Unavailable) else "error", reason=common.reason(e))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            key = tuple(sorted(point["key"].items()))
            if variant == "dense" and row["status"] == "ok":
                dense_ref[key] = row
            write(with_ratios(row, dense_ref.get(key)))
        if variant != "dense":  # the next variant starts from dense
            for lin in dense_layers.values():
                lin.to(device)
            variants.apply_variant(model, "dense", args.block_size, dense_layers)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_model(name: str, args, device, env: dict, out: common.CsvOut) -> list[dict]:
    import transformers

    dtype = common.DTYPES[args.dtype]
    rows: list[dict] = []
    base = dict(env, transformers=transformers.__version__, model=name, dtype=args.dtype)

    def write(row):
        rows.append(row)
        out.write(row)
        print(summary_line(row), flush=True)

    try:
        model, source, n_layers, note = models.build_model(name, args.layers, dtype, device)
    except Unavailable as e:
        write(dict(base, phase="load", status="unavailable", reason=str(e)))
        if name == "smollm2-135m":  # same shape, random weights: speed does not depend on values
            return rows + run_model("smollm2-135m-shaped", args, device, env, out)
        return rows
    base.update(source=source, n_layers=n_layers, layers_note=note)
    dense_layers = models.target_linears(model)
    dense_ref: dict[tuple, dict] = {}
    with torch.no_grad():  # not inference_mode: dense layers are moved off and back between variants
        for variant in args.variants:
            run_variant(model, variant, dense_layers, args, device, dict(base, variant=variant), dense_ref, write)
    del model
    return rows


def summary_line(r: dict) -> str:
    what = f"{r.get('model')} {r.get('variant', '')} {r.get('phase')}"
    if r.get("phase") in ("prefill", "decode"):
        what += f" tokens={r.get('tokens')} batch={r.get('batch')} {r.get('decode_mode', '')}"
    if r.get("status") != "ok":
        return f"{what}: {r.get('status')} ({r.get('reason')})"
    keys = ("tokens_per_s", "peak_mem_gib", "resident_gib", "weights_bytes", "layout_bytes", "disk_bytes",
            "speedup_vs_dense", "bytes_vs_dense")  # fmt: skip
    vals = [f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys if r.get(k) not in (None, "")]
    return f"{what}: " + " ".join(vals)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="llama3-8b-shaped,smollm2-135m (default both; smoke: tiny)")
    p.add_argument("--layers", type=int, default=None, help="use this many decoder layers (the rows say so)")
    p.add_argument("--variants", default=",".join(variants.VARIANTS), help=",".join(variants.VARIANTS))
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    p.add_argument("--prefill", default=None, help="prefill token counts (default 512,2048)")
    p.add_argument("--decode-batches", default=None, help="decode batch sizes (default 1,16)")
    p.add_argument("--decode-modes", default=None, help="eager,static,cuda_graph (default eager,cuda_graph)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens before decoding (default 128)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps timed (default 64)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per point, median kept (default 3)")
    p.add_argument("--block-size", type=int, default=None, help="ARMOR block size per side (default 128; smoke 8)")
    p.add_argument("--no-disk", dest="disk", action="store_false", help="skip the save-to-disk size rows")
    p.add_argument("--disk-max-gb", type=float, default=None, help="skip saving models with more weight GiB than this")
    p.add_argument("--scratch", default=None, help="folder for temporary checkpoints (default: system temp)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/bench_e2e.csv", help="CSV to append to (default runs/bench_e2e.csv)")
    p.add_argument("--smoke", action="store_true", help="tiny model, few tokens: a harness check in seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = args.smoke
    device = common.pick_device(args.device)
    names = common.parse_list(args.models or ("tiny" if s else "llama3-8b-shaped,smollm2-135m"))
    args.variants = common.parse_list(args.variants)
    args.prefill = common.parse_list(args.prefill or ("16" if s else "512,2048"), int)
    args.decode_batches = common.parse_list(args.decode_batches or ("1,2" if s else "1,16"), int)
    args.decode_modes = common.parse_list(args.decode_modes or "eager,cuda_graph")
    args.prompt = args.prompt or (8 if s else 128)
    args.new_tokens = args.new_tokens or (4 if s else 64)
    args.reps = args.reps or (1 if s else 3)
    args.block_size = args.block_size or (8 if s else 128)  # tiny dims: 8 keeps the wrappers small
    env = common.env_info(device.type)
    out = common.CsvOut(args.out, COLUMNS)
    n = 0
    try:
        for name in names:
            n += len(run_model(name, args, device, env, out))
    finally:
        out.close()
    print(f"wrote {n} rows to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
