"""Machine-code statistics of a compiled kernel, and lower bounds on its run time.

Works on a cubin without a GPU: ``cuobjdump --dump-resource-usage`` for registers,
spills (stack) and static shared memory, ``nvdisasm -c`` for the instructions.
Loops are the ranges closed by a backward branch; the *main loop* is the one
with the most global loads (the weight stream).

Pipe rates (warp-instructions per cycle per SM sub-partition, 4 per SM), from
NVIDIA's published unit counts per SM: H100/H200 have 128 FP32 lanes, 64 INT32
lanes and 32 load/store lanes per SM; A100 has 64 FP32, 64 INT32 and 32 LD/ST.
So per sub-partition: issue 1; FP32 and IMAD together ("fma") 1 on sm_90 and 0.5
on sm_80; IMAD alone 0.5 on both (Nsight Compute's pipeline list: integer
multiplies run only on the "fmaheavy" half of the FMA pipe; 64 IMAD/clk/SM in the
CUDA programming guide's throughput table for 8.x and 9.0); integer/logic/select
("alu") 0.5; memory and shuffles ("lsu") 0.25. These give lower bounds:
dependencies, latency and bank conflicts only add time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

# opcode (first dotted part) -> class
_FMA = {"FFMA", "FMUL", "FADD", "IMAD", "HFMA2", "HMUL2", "HADD2", "FMNMX2"}
_ALU = {
    "LOP3", "IADD3", "SHF", "SEL", "FSEL", "ISETP", "FSETP", "PRMT", "LEA", "FMNMX", "IMNMX", "VIMNMX",
    "IABS", "PLOP3", "MOV", "SGXT", "BMSK", "LOP", "IADD", "FCHK", "P2R", "R2P", "PSETP",
    "HSETP2", "HSET2", "VIADD", "VIADDMNMX", "FLO", "POPC", "BREV",
}  # fmt: skip
_CVT = {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND"}
_MMA = {"HMMA", "HGMMA", "IMMA", "DMMA", "WGMMA", "UTMMA"}
_LSU = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LD", "ST", "LDL", "STL", "ATOM", "ATOMG", "ATOMS",
        "RED", "REDG", "SHFL", "LDGSTS", "MATCH", "CCTL", "LDGDEPBAR", "UBLKCP", "UTMALDG"}  # fmt: skip
_BAR = {"BAR", "MEMBAR", "SYNCS", "WARPSYNC", "BSYNC", "ERRBAR", "FENCE"}

ISSUE_RATE = 1.0
PIPE_RATES = {
    "sm_90a": {"fma": 1.0, "imad": 0.5, "alu": 0.5, "lsu": 0.25},
    "sm_80": {"fma": 0.5, "imad": 0.5, "alu": 0.5, "lsu": 0.25},
}


@dataclass
class GPU:
    name: str
    arch: str
    sms: int
    clock_hz: float
    bandwidth: float  # bytes/s used for the memory floor
    bandwidth_src: str
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024


GPUS = {
    "H200": GPU("H200", "sm_90a", 132, 1.98e9, 4.3e12, "4.3 TB/s: device copy measured on one H200"),
    "A100": GPU(
        "A100",
        "sm_80",
        108,
        1.41e9,
        2.039e12,
        "2.04 TB/s: A100-80G SXM datasheet (no copy measured)",
        smem_per_sm=164 * 1024,
        smem_per_block=163 * 1024,
    ),
}


def tool(name: str) -> str:
    """Triton's bundled CUDA binary tool, else one on PATH."""
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    p = shutil.which(name)
    if p is None:
        raise FileNotFoundError(f"{name} not found (Triton's bundled tools or PATH)")
    return p


def _run_on_cubin(cubin: bytes, *args: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        return subprocess.run([*args, path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)


_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"\(?(\.L_x_\d+)\)?")


def resource_usage(cubin: bytes) -> dict:
    out = _run_on_cubin(cubin, tool("cuobjdump"), "--dump-resource-usage")
    m = _RES.search(out)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{out}")
    reg, stack, shared, local = (int(g) for g in m.groups())
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


def classify(op: str, mods: str) -> str:
    if op in _MMA:
        return "mma"
    if op in _LSU:
        return "lsu"
    if op in _FMA:
        return "fma"
    if op in _ALU:
        return "alu"
    if op in _CVT:
        return "cvt"
    if op in _BAR:
        return "sync"
    return "other"


def load_width(op: str, mods: str) -> int:
    """Bytes per thread of a load/store from its modifiers (.128, .64, .U8, .U16, ... default 32-bit)."""
    for w, b in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if w in mods:
            return b
    return 4


@dataclass
class Loop:
    start: int
    end: int
    counts: Counter = field(default_factory=Counter)

    @property
    def size(self) -> int:
        return self.end - self.start + 1


def disassemble(cubin: bytes) -> list[tuple[str, str, str]]:
    """[(opcode, modifiers, operands or label marker)] in program order; labels as ('LABEL', name, '')."""
    out = _run_on_cubin(cubin, tool("nvdisasm"), "-c")
    ins = []
    for line in out.splitlines():
        lab = _LABEL.match(line.strip())
        if lab:
            ins.append(("LABEL", lab.group(1), ""))
            continue
        m = _LINE.search(line)
        if m:
            ins.append((m.group(2), m.group(3), m.group(4)))
    return ins


def count(ins) -> Counter:
    """Counts by class plus detail keys: ``ldg.<bytes>``, ``shfl``, ``bar``, ``ffma``, ``imad`` (in ``fma``), ..."""
    c = Counter()
    for op, mods, args in ins:
        if op == "LABEL" or op == "NOP":
            continue
        cls = classify(op, mods)
        c["total"] += 1
        c[cls] += 1
        if op in ("LDG",):
            c[f"ldg{load_width(op, mods) * 8}"] += 1
        elif op in ("STG",):
            c["stg"] += 1
        elif op in ("LDS", "LDSM"):
            c["lds"] += 1
        elif op in ("STS", "STSM"):
            c["sts"] += 1
        elif op == "SHFL":
            c["shfl"] += 1
        elif op in ("ATOM", "ATOMG", "RED", "REDG"):
            c["atom"] += 1
        elif op == "BAR":
            c["bar"] += 1
        elif op in ("FFMA", "HFMA2"):
            c["ffma"] += 1
        elif op == "IMAD":
            c["imad"] += 1
        elif op in ("LDL", "STL"):
            c["local"] += 1
    return c


def loops(ins) -> list[Loop]:
    labels = {}
    for i, (op, name, _) in enumerate(ins):
        if op == "LABEL":
            labels[name] = i
    found = []
    for i, (op, mods, args) in enumerate(ins):
        if op == "BRA":
            m = _TARGET.search(args)
            if m and m.group(1) in labels and labels[m.group(1)] < i:
                lp = Loop(labels[m.group(1)], i)
                lp.counts = count(ins[lp.start : lp.end + 1])
                found.append(lp)
    return found


def main_loop(ins) -> Loop | None:
    """The loop with the most global loads (ties: the larger body)."""
    cands = loops(ins)
    if not cands:
        return None

    def gloads(lp):
        return sum(v for k, v in lp.counts.items() if k.startswith("ldg"))

    return max(cands, key=lambda lp: (gloads(lp), lp.size))


def occupancy(gpu: GPU, regs: int, num_warps: int, shared: int) -> int:
    """Resident blocks per SM from registers (allocated per warp in units of 256), threads and shared memory."""
    regs_per_warp = ((max(regs, 1) * 32 + 255) // 256) * 256
    by_regs = gpu.regs_per_sm // (regs_per_warp * num_warps)
    by_threads = gpu.threads_per_sm // (32 * num_warps)
    by_smem = gpu.smem_per_sm // shared if shared else gpu.blocks_per_sm
    return max(0, min(by_regs, by_threads, by_smem, gpu.blocks_per_sm))


def issue_cycles(counts: Counter, arch: str) -> float:
    """Cycles one SM sub-partition needs to issue these warp-instructions: the slowest of issue and each pipe."""
    rates = PIPE_RATES[arch]
    t = counts.get("total", 0) / ISSUE_RATE
    for pipe, r in rates.items():
        t = max(t, counts.get(pipe, 0) / r)
    return t
