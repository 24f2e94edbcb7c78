"""Load a causal LM and its tokenizer from a short name, a GGUF file, a local HF directory or an ARMOR checkpoint.

Model code that is not part of transformers (``auto_map`` in config.json) is never run unless the caller
passes ``trust_remote_code=True`` (``--trust-remote-code``); transformers' interactive prompt is never reached.
"""

from __future__ import annotations

import contextlib
import os

import torch

from armor_solver.models import ModelSpecError, gguf_dtype, read_config, resolve

from .checkpoint import is_armor_checkpoint, load_pretrained


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
            model = load_pretrained(
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
