"""Greedy decoding for the end-to-end benchmark: ``eager`` with a dynamic KV cache, ``static``
with a static cache, ``cuda_graph`` with a static cache and one captured step replayed."""

from __future__ import annotations

import inspect
import math
import time

import torch

from benchmarks import common
from benchmarks.common import Unavailable
from benchmarks.e2e.measure import forward_last, peak_memory

MODES = ("eager", "static", "cuda_graph")


def cache_kwarg(model) -> str:
    """The name the model's forward takes its KV cache by (``cache`` in recent transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def measure_decode_eager(model, batch: int, prompt: int, new: int, device, reps: int) -> dict:
    from transformers import DynamicCache

    ids = torch.randint(model.config.vocab_size, (batch, prompt), device=device)
    ck = cache_kwarg(model)

    def run():
        cache = DynamicCache()
        out = forward_last(model, ids, use_cache=True, **{ck: cache})
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


def capture_step(dec: StaticDecoder):
    """One decode step captured as a CUDA graph, after warm-up on the capture stream (plans,
    searches, workspaces exist before capture); checked against the same step run eagerly."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            dec.rewind()
            eager = dec.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    dec.rewind()
    with torch.cuda.graph(graph, stream=side):
        captured = dec.step()
    dec.rewind()
    graph.replay()
    torch.cuda.synchronize()
    err = float((captured.float() - eager.float()).abs().max())
    if not math.isfinite(err) or err > 1e-2 * float(eager.float().abs().max()) + 1e-3:
        raise RuntimeError(f"graph replay differs from the eager step by {err:.3g}")

    def replay():
        graph.replay()
        return captured

    return replay


def measure_decode_static(model, batch: int, prompt: int, new: int, device, reps: int, graph: bool) -> dict:
    """Decode with a static KV cache; with ``graph`` one step is captured and replayed."""
    ids = torch.randint(model.config.vocab_size, (batch, prompt), device=device)
    dec = StaticDecoder(model, ids, new)
    one = capture_step(dec) if graph else dec.step

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


def decode(model, batch: int, mode: str, prompt: int, new: int, device, reps: int) -> dict:
    if mode == "eager":
        return measure_decode_eager(model, batch, prompt, new, device, reps)
    if mode == "cuda_graph":
        if device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device")
        return measure_decode_static(model, batch, prompt, new, device, reps, graph=True)
    if mode == "static":
        return measure_decode_static(model, batch, prompt, new, device, reps, graph=False)
    raise ValueError(f"--decode-modes: unknown {mode!r}; known: {', '.join(MODES)}")
