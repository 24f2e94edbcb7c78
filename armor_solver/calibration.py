"""Capture the inputs of every target linear, one decoder block at a time.

Layer-wise onloading (memory bounded by one block): the embeddings run once to
give the inputs of block 0; then each block moves to the device, runs on the
stored hidden states of every calibration sample with forward hooks on its
target linears (folding the inputs into ``LayerStats`` in fp32), and its
outputs become the next block's inputs. The model itself stays where it is.

The keyword arguments a block receives (rotary embeddings, masks, ...) are
recorded per block from one pass of the model with the blocks replaced by
identity stubs, so families whose blocks differ (Gemma3's sliding/global
attention) get their own.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from .stats import LayerStats
from .targets import default_targets, is_target


class CalibrationError(ValueError):
    """The model or its statistics cannot be used for pruning."""


class _Stop(Exception):
    """Raised by the block-0 stub once its input is recorded: the rest of the model need not run."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks (``model.layers`` for Llama, Qwen, Mistral, Gemma3)."""
    best = None
    for name, module in model.named_modules():
        is_blocks = isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module)
        if is_blocks and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise CalibrationError(f"{type(model).__name__}: no decoder block list ('*.layers') found")
    return best


def model_targets(model: nn.Module, targets=None) -> tuple[str, ...]:
    if targets:
        return tuple(targets)
    return default_targets(getattr(model.config, "model_type", "?"))


def find_targets(model: nn.Module, targets=None, ignore=()) -> dict[int, dict[str, nn.Linear]]:
    """block index -> {module name: nn.Linear} of the linears to prune, in module order."""
    prefix, _ = decoder_layers(model)
    targets = model_targets(model, targets)
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    found: dict[int, dict[str, nn.Linear]] = defaultdict(dict)
    linears = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        linears.append(name)
        if not is_target(name, targets, ignore):  # is_target refuses NEVER names
            continue
        m = pattern.match(name)
        if m is None:
            continue  # only linears inside decoder blocks are pruned
        found[int(m.group(1))][name] = module
    if not found:
        shown = ", ".join(linears[:8]) or "none"
        raise CalibrationError(
            f"no linear layer matches targets {list(targets)} (ignore {list(ignore)}) inside {prefix}; "
            f"the model's linears are: {shown}{' ...' if len(linears) > 8 else ''}"
        )
    return dict(sorted(found.items()))


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def check_finite_stats(name: str, stats: LayerStats) -> None:
    for what, t in (("h", stats.h), ("XᵀX", stats.xtx)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise CalibrationError(
                f"{name}: calibration statistics {what} contain NaN or Inf (the layer's inputs overflowed "
                "or the model is broken); nothing of this block was written"
            )


class LayerwiseRunner:
    """Holds the hidden states entering the current block for every calibration sample."""

    def __init__(
        self, model: nn.Module, input_ids: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 4
    ):
        self.model = model
        self.device = torch.device(device)
        self.prefix, self.layers = decoder_layers(model)
        hidden, self.block_kwargs = self._capture(input_ids)
        # samples run through a block in batches; the recorded kwargs (batch 1: rotary tables,
        # causal masks) broadcast over the batch because every sample has the same length
        self.hidden = [torch.cat(hidden[i : i + batch_size]) for i in range(0, len(hidden), batch_size)]
        self.next_block = 0

    @torch.no_grad()
    def _capture(self, input_ids: torch.Tensor):
        n = len(self.layers)
        kwargs: list[dict | None] = [None] * n
        hidden: list[torch.Tensor] = []
        record_all = [True]  # the first sample runs through every stub to record each block's kwargs

        def stub_for(i):
            def stub(hidden_states, *args, **kw):
                if args:
                    raise CalibrationError(f"block {i} got positional arguments besides hidden_states; unsupported")
                if kwargs[i] is None:
                    kwargs[i] = {k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "use_cache")}
                if i == 0:
                    hidden.append(hidden_states.detach())
                    if not record_all[0]:
                        raise _Stop
                return hidden_states

            return stub

        originals = [layer.forward for layer in self.layers]
        emb_device = self.model.get_input_embeddings().weight.device
        try:
            for i, layer in enumerate(self.layers):
                layer.forward = stub_for(i)
            for s in range(input_ids.shape[0]):
                try:
                    self.model(input_ids=input_ids[s : s + 1].to(emb_device), use_cache=False)
                except _Stop:
                    pass
                record_all[0] = False
        finally:
            for layer, fwd in zip(self.layers, originals):
                layer.forward = fwd
            for layer in self.layers:
                layer.__dict__.pop("forward", None)
        return hidden, [_to(k or {}, self.device) for k in kwargs]

    @torch.no_grad()
    def run_block(
        self,
        index: int,
        stats: dict[str, LayerStats] | None = None,
        linears: dict[str, nn.Linear] | None = None,
        advance: bool = True,
    ) -> None:
        """Run block ``index`` on every sample; fold target inputs into ``stats``; if ``advance``,
        its outputs replace the stored hidden states (they enter block ``index + 1``)."""
        if index != self.next_block:
            raise RuntimeError(f"block {index} run out of order (the stored inputs enter block {self.next_block})")
        layer = self.layers[index]
        home = next(layer.parameters()).device
        layer.to(self.device)
        handles = []
        for name, module in (linears or {}).items():
            if stats is not None and name in stats:
                handles.append(module.register_forward_hook(lambda m, inp, out, s=stats[name]: s.add(inp[0])))
        try:
            outputs = []
            for h in self.hidden:
                out = layer(h.to(self.device), **self.block_kwargs[index])
                out = out[0] if isinstance(out, tuple) else out
                if advance:
                    outputs.append(out.to(h.device))
        finally:
            for handle in handles:
                handle.remove()
            layer.to(home)
        if advance:
            self.hidden = outputs
            self.next_block = index + 1


def new_stats(linears: dict[str, nn.Linear], full: bool, device) -> dict[str, LayerStats]:
    return {name: LayerStats.empty(m.in_features, full=full, device=device) for name, m in linears.items()}


def collect_dense_stats(
    model: nn.Module,
    input_ids: torch.Tensor,
    targets=None,
    ignore=(),
    device="cpu",
    full: bool = False,
    progress=None,
) -> dict[str, LayerStats]:
    """Statistics of every target linear of the dense model (one pass per block)."""
    by_block = find_targets(model, targets, ignore)
    runner = LayerwiseRunner(model, input_ids, device)
    out: dict[str, LayerStats] = {}
    last = max(by_block)
    for i in range(last + 1):
        linears = by_block.get(i, {})
        stats = new_stats(linears, full, device)
        runner.run_block(i, stats, linears, advance=i < last)
        for name, s in stats.items():
            check_finite_stats(name, s)
        out.update(stats)
        if progress is not None:
            progress(i)
    return out
