"""benchmarks.kernel_static: every decode kernel still compiles for sm_80 and sm_90a (smoke mode), and the
machine-code statistics it rests on read loops and instruction classes correctly."""

import os
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks import sass_stats as ss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   LDG.E.U16 R8, desc[UR4][R6.64] ;
        /*0030*/                   FFMA R9, R4, R5, R9 ;
        /*0040*/                   LOP3.LUT R10, R8, 0x1, RZ, 0xc0, !PT ;
        /*0050*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0060*/                   SHFL.BFLY PT, R3, R9, 0x1, 0x1f ;
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/               @!P1 BRA `(.L_x_2) ;
        /*0090*/                   EXIT ;
"""


def test_sass_loop_and_classes(monkeypatch):
    monkeypatch.setattr(ss, "_run_on_cubin", lambda cubin, *args: SASS)
    ins = ss.disassemble(b"")
    lps = ss.loops(ins)
    assert len(lps) == 2
    main = ss.main_loop(ins)
    c = main.counts
    assert (c["ldg128"], c["ldg16"], c["ffma"], c["alu"], c["lsu"], c["total"]) == (1, 1, 1, 1, 2, 5)
    other = next(lp for lp in lps if lp.start != main.start).counts
    assert (other["shfl"], other["bar"]) == (1, 1)
    # issue: 5 warp-instructions; the lsu pipe needs 2 / 0.25 = 8 cycles: the bound is the slower
    assert ss.issue_cycles(c, "sm_90a") == 8.0
    assert ss.issue_cycles(Counter(total=10, fma=10), "sm_80") == 20.0  # A100: half-rate FP32 per partition
    # H200: 10 FFMA + 10 IMAD fit the FMA pipe in 20 cycles, but IMAD alone runs at half rate
    assert ss.issue_cycles(Counter(total=20, fma=20, imad=10), "sm_90a") == 20.0
    assert ss.issue_cycles(Counter(total=20, fma=20, imad=16), "sm_90a") == 32.0


def test_occupancy_limits():
    h = ss.GPUS["H200"]
    assert ss.occupancy(h, 128, 8, 0) == 2  # 128 regs x 256 threads = half the register file
    assert ss.occupancy(h, 64, 4, 0) == 8
    assert ss.occupancy(h, 32, 4, 100 * 1024) == 2  # shared memory bound


def test_smoke_compiles_every_decode_kernel_for_both_targets():
    pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_static", "--smoke"],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if "launches" in line]
    # 2 GPUs x 2 shapes x 2 token counts, each decode layer in 2 launches with a finite prediction
    assert len(lines) == 8, p.stdout
    for line in lines:
        assert "2 launches" in line and "predicted" in line, line
    assert any(line.startswith("H200") for line in lines) and any(line.startswith("A100") for line in lines)
    # the opt-in programmatic-dependent-launch variant compiles, with both grid-dependency instructions
    assert "programmatic dependent launch" in p.stdout and "PREEXIT in blockdiag, ACQBULK in sparse24_small" in p.stdout
