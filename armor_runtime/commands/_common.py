"""What several subcommands share: dtype names, --device and --trust-remote-code, checked before any work."""

from __future__ import annotations

DTYPES = ("auto", "float32", "float16", "bfloat16")


def torch_dtype(name: str):
    """"auto" (keep what is stored) or the torch dtype of that name."""
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def add_model_arguments(parser, model_help: str, dtype_help: str) -> None:
    """--model, --device, --dtype and --trust-remote-code: how a command that runs a model loads it."""
    parser.add_argument("--model", required=True, help=model_help)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help=dtype_help)
    add_trust_remote_code(parser)


def add_trust_remote_code(parser) -> None:
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow running model code shipped with the checkpoint (auto_map in config.json); off by default",
    )


def check_device(spec: str) -> str:
    """``spec`` when it names a device this process can use; else a ``ValueError`` saying why and what to use."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {spec!r}: not a device ({e}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(f"--device {spec}: this PyTorch ({torch.__version__}) is built without CUDA; use --device cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: no CUDA GPU is visible to this process; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {spec}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type not in ("cpu", "meta"):
        backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"--device {spec}: {device.type} is not available in this PyTorch build; use --device cpu")
    return spec


def check_shard_size(value: str | None) -> str | int | None:
    """``--max-shard-size`` in a form transformers understands (100MB, 2GB, or bytes), checked before any work."""
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    from transformers.utils.hub import convert_file_size_to_int

    try:
        if convert_file_size_to_int(value) <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--max-shard-size {value!r}: expected a size such as 100MB or 2GB, or a number of bytes") from None
    return value
