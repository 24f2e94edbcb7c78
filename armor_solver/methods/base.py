"""What every pruning method takes and returns."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

from armor_kernels import WRAPPER_BUDGET, ArmorWeights


@dataclass
class PruneConfig:
    """Settings shared by the methods; each method reads what it needs."""

    block_size: int | None = 128  # preferred wrapper block size per side (the largest valid divisor <= this is used)
    wrapper_budget: float = WRAPPER_BUDGET  # block_size None: the largest blocks whose wrappers stay within this share
    iters: int | None = None  # ARMOR: iteration / sweep budget (None: the method's default)
    device: str = "cpu"
    extra: dict = field(default_factory=dict)  # method-specific options, recorded in the checkpoint


@dataclass
class MethodResult:
    weights: ArmorWeights  # packed, in the layer's dtype
    info: dict  # at least {"proxy_loss": float}; ARMOR adds {"init_loss", "iters", "seconds", ...}


@dataclass(frozen=True)
class Option:
    """One method option (``cfg.extra[key]``, ``--key-name`` on the command line)."""

    kind: type  # int, float, str or bool
    help: str = ""
    default: object = None  # what applies when the option is not given
    choices: tuple = ()
    minimum: float | None = None  # inclusive
    only_with: tuple | None = None  # (other option, value or tuple of values) it applies with, e.g. ("solver", "adam")


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _kind_ok(value, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def check_options(method: str, options: dict[str, Option], extra: dict, near: tuple[str, ...] = ()) -> None:
    """Refuse unknown keys (listing the valid ones, with a "did you mean") and values of the wrong kind or range.

    ``near``: other option names the caller accepts (the pipeline's own), offered as suggestions too.
    """
    valid = ", ".join(flag(k) for k in options) or "no options"
    for key in extra:
        if key not in options:
            close = difflib.get_close_matches(key, [*options, *near], n=1, cutoff=0.6)
            hint = f" (did you mean {flag(close[0])}?)" if close else ""
            raise ValueError(f"method {method}: unknown option {flag(key)}{hint}; {method} takes: {valid}")
    for key, value in extra.items():
        opt = options[key]
        where = f"method {method}: {flag(key)} {value!r} (cfg.extra[{key!r}])"
        if not _kind_ok(value, opt.kind):
            raise ValueError(f"{where}: expected {'a number' if opt.kind is float else opt.kind.__name__}")
        if opt.choices and value not in opt.choices:
            raise ValueError(f"{where}: choose one of {', '.join(map(str, opt.choices))}")
        if opt.minimum is not None and value < opt.minimum:
            raise ValueError(f"{where}: must be at least {opt.minimum}")
        if opt.only_with is not None:
            other, wanted = opt.only_with
            current = extra.get(other, options[other].default)
            wanted = wanted if isinstance(wanted, tuple) else (wanted,)
            if current not in wanted:
                need = " or ".join(map(str, wanted))
                raise ValueError(f"{where}: applies only with {flag(other)} {need} (here {flag(other)} is {current})")
