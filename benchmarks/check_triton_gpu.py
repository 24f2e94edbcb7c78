"""Every Triton kernel against the reference on real layer shapes, on a GPU.

    python -m benchmarks.check_triton_gpu [--quick] [--time]

Prints one row per (kernel, shape, tokens, dtype): the max error against the
fp64 oracle, the allowed error (4x PyTorch's same-dtype error + 1 ulp of the
output magnitude), and PASS/FAIL. ``--time`` adds the median time
(``triton.testing.do_bench``) and dense ``F.linear``'s for the layer.
Exit code: 0 all pass, 1 any mismatch, 2 no GPU or no triton.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import torch

# d_out, d_in, b_out, b_in: Llama-3-8B (attention, MLP up/gate, MLP down) and SmolLM2-135M
SHAPES = [
    (4096, 4096, 128, 128),
    (14336, 4096, 128, 128),
    (4096, 14336, 128, 128),
    (1536, 576, 128, 96),
    (576, 1536, 96, 128),
]
QUICK_SHAPES = SHAPES[:1] + SHAPES[3:4]
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}


def make_layer(d_out, d_in, b_out, b_in, dtype, device):
    from armor_kernels import ArmorWeights, sparse24

    g = torch.Generator(device="cpu").manual_seed(d_out * 7 + d_in)
    core = torch.randn(d_out, d_in, generator=g)
    mask = sparse24.topk_mask(core.abs())
    return ArmorWeights.from_factors(
        torch.randn(d_out // b_out, b_out, b_out, generator=g) / b_out**0.5,
        torch.where(mask, core, 0.0) / (d_in / 2) ** 0.5,
        torch.randn(d_in // b_in, b_in, b_in, generator=g) / b_in**0.5,
        bias=torch.randn(d_out, generator=g),
        mask=mask,
        dtype=dtype,
    ).to(device)


def judge(got, exact, same, dtype) -> tuple[float, float, bool]:
    exact = exact.double()
    err = float((got.double() - exact).abs().max())
    allowed = 4 * float((same.double() - exact).abs().max()) + EPS[dtype] * float(exact.abs().max())
    return err, allowed, bool(torch.isfinite(got).all()) and err <= allowed


def cases(w, x, full=True):
    """(kernel name, run, fp64-ish oracle, PyTorch same-dtype result) for one layer and input."""
    from armor_kernels import reference, sparse24
    from armor_kernels.backends import triton as tb

    f = torch.nn.functional
    dt = x.dtype
    a, v, m, b, bias = w.a, w.values, w.meta, w.b, w.bias
    core = sparse24.decompress(v, m)
    tokens = x.shape[0]

    def bd_same(t, blocks, bb=None):
        n, bs, _ = blocks.shape
        y = torch.einsum("mnk,njk->mnj", t.reshape(t.shape[0], n, bs), blocks).reshape(t.shape)
        return y if bb is None else y + bb

    x64, a64, v64, b64, bias64 = (t.double() for t in (x, a, v, b, bias))
    z64 = reference.sparse24_matmul(x64, v64, m)
    w_hat = reference.materialize(a, v, m, b)
    yield "blockdiag B", lambda: tb.blockdiag(x, b), reference.blockdiag_matmul(x64, b64), bd_same(x, b)
    zin = torch.randn(tokens, a.shape[0] * a.shape[1], device=x.device).to(dt)
    yield (
        "blockdiag A+bias",
        lambda: tb.blockdiag(zin, a, bias),
        reference.blockdiag_matmul(zin.double(), a64, bias64),
        bd_same(zin, a, bias),
    )
    yield (
        "sparse24 +bias",
        lambda: tb.sparse24_small(x, v, m, bias=bias),
        reference.sparse24_matmul(x64, v64, m, bias64),
        f.linear(x, core, bias),
    )
    if full:
        yield (
            "sparse24 +bias split1",
            lambda: tb.sparse24_small(x, v, m, bias=bias, split_k=1),
            reference.sparse24_matmul(x64, v64, m, bias64),
            f.linear(x, core, bias),
        )
    if tb.fusable(a):
        yield (
            "sparse24 +A+bias",
            lambda: tb.sparse24_small(x, v, m, a=a, bias=bias),
            reference.blockdiag_matmul(z64, a64, bias64),
            bd_same(f.linear(x, core), a, bias),
        )
    yield (
        "decode_layer",
        lambda: tb.decode_layer(x, a, v, m, b, bias),
        reference.armor_linear(x64, a64, v64, m, b64, bias64),
        f.linear(x, w_hat.to(dt), bias),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one Llama and one SmolLM2 shape, bf16, 1 and 16 tokens")
    p.add_argument("--time", action="store_true", help="also print median times (do_bench) and dense F.linear")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check", file=sys.stderr)
        return 2
    from armor_kernels import reference
    from armor_kernels.backends import triton as tb

    if tb.IMPORT_ERROR:
        print(f"triton unavailable: {tb.IMPORT_ERROR}", file=sys.stderr)
        return 2
    import triton

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float16]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    header = (
        f"{'kernel':22s} {'d_out x d_in':>12s} {'b':>7s} {'tok':>4s} {'dtype':9s} {'max err':>10s} {'allowed':>10s}  ok"
    )
    print(header + ("   t_us  dense_us" if args.time else ""))
    failures = 0
    for d_out, d_in, b_out, b_in in shapes:
        for dtype in dtypes:
            w = make_layer(d_out, d_in, b_out, b_in, dtype, "cuda")
            dense = reference.materialize(w.a, w.values, w.meta, w.b).to(dtype) if args.time else None
            for tokens in (1, 16) if args.quick else (1, 4, 16):
                x = torch.randn(tokens, d_in, device="cuda").to(dtype)
                for name, fn, exact, same in cases(w, x, full=not args.quick):
                    first = fn()
                    again = fn()  # split-K counters must be reset by the first call
                    err, allowed, ok = judge(first, exact, same, dtype)
                    ok = ok and torch.equal(first, again)
                    failures += not ok
                    row = (
                        f"{name:22s} {f'{d_out}x{d_in}':>12s} {f'{b_out}/{b_in}':>7s} {tokens:4d} "
                        f"{str(dtype).replace('torch.', ''):9s} {err:10.3g} {allowed:10.3g}  {'PASS' if ok else 'FAIL'}"
                    )
                    if args.time:
                        t = triton.testing.do_bench(fn) * 1e3
                        td = triton.testing.do_bench(partial(torch.nn.functional.linear, x, dense, w.bias)) * 1e3
                        row += f" {t:7.1f} {td:8.1f}"
                    print(row, flush=True)
            del w
            torch.cuda.empty_cache()
    print(f"# {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
