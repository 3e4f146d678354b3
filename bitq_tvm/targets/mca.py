"""Static throughput of emitted assembly with ``llvm-mca``: the hot loops of compiled kernels.

Sits beside the target presets (``targets``): it reads the assembly TVM emitted for a preset's
LLVM target and knows nothing of models, plans or kernels. :mod:`bitq_tvm.solver.mca_cost` turns
these loop throughputs into per-kernel cycle estimates.

What is measured here is a **model**, not a run: ``llvm-mca`` simulates a loop body under LLVM's
scheduling model of a core (``-mcpu``), assuming every load hits L1, no branch mispredicts and a
steady state of many iterations. We take ``Total Cycles / Iterations`` of that simulation (the
resource bound *and* the loop-carried latency chains) as the cycles of one iteration.

Assembly structure relied on (TVM 0.27 + LLVM 22, GNU syntax): a kernel ``NAME`` is emitted as
``__tvm_ffi_NAME``, ``NAME_compute_`` and the ``.L__tvm_parallel_lambda*`` functions that follow
it; a loop is a label with a later branch back to it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import subprocess

from ..errors import BitqError
from .presets import TargetPreset

MCA_EXECUTABLE = "llvm-mca-22"
MCA_ITERATIONS = 200
# LLVM scheduling models used for each preset (LLVM has no model of the XuanTie C908 or SpacemiT
# X60; sifive-x280 is LLVM's RVV model, sifive-u74 its in-order RV64GC model).
MCA_CPU = {
    "cortex-a53": "cortex-a53", "cortex-a55": "cortex-a55", "cortex-a76": "cortex-a76",
    "neoverse-n2": "neoverse-n2", "rv64gcv-vlen128": "sifive-x280", "rv64gcv-vlen256": "sifive-x280",
    "rv64gc": "sifive-u74", "avx512-vnni": "znver4", "avx2": "skylake",
}
# Nominal clocks (GHz) of the boards the presets describe, for the memory term only.
CLOCK_GHZ = {
    "cortex-a53": 1.2, "cortex-a55": 2.0, "cortex-a76": 2.4, "neoverse-n2": 3.0,
    "rv64gcv-vlen128": 1.6, "rv64gcv-vlen256": 1.6, "rv64gc": 1.5, "avx512-vnni": 3.0, "avx2": 3.4,
}

_LABEL = re.compile(r"^([.\w$]+):")
_FUNC_TYPE = re.compile(r"^\s*\.type\s+([.\w$]+),\s*@function")
_SIMD_ARRANGEMENT = re.compile(r"\bv\d+\.(\d+)([bhsd])\b")
_COMMENT = re.compile(r"(//|\s#\s|\s#$).*$")
_VSET = re.compile(r"^\s*vset(i?)vli\s+\w+,\s*(\w+),\s*e(\d+),\s*m(f?)(\d+)")


@dataclasses.dataclass(frozen=True)
class McaResult:
    """One ``llvm-mca`` simulation: cycles per iteration and the resource-only bound."""

    cycles_per_iteration: float
    block_rthroughput: float
    instructions: int


@dataclasses.dataclass(frozen=True)
class AsmLoop:
    """A loop of one function: instruction lines ``[start, end]`` (label to back branch)."""

    start: int
    end: int
    label: str


def mca_executable() -> str:
    """Path of ``llvm-mca-22``; BitqError if it is not installed."""
    path = shutil.which(MCA_EXECUTABLE)
    if path is None:
        raise BitqError(f"{MCA_EXECUTABLE} not found: install Debian's llvm-22 (apt-get install -y llvm-22; "
                        "the preinstalled llvm-mca 14 cannot read the assembly TVM's LLVM 22 emits)")
    return path


def mca_cpu(preset: TargetPreset) -> str:
    """The LLVM ``-mcpu`` whose scheduling model prices ``preset``; BitqError for other targets."""
    try:
        return MCA_CPU[preset.name]
    except KeyError:
        raise BitqError(f"no llvm-mca scheduling model for target {preset.name!r}; known: "
                        f"{', '.join(sorted(MCA_CPU))}") from None


def mca_mattr(preset: TargetPreset) -> str:
    """``-mattr`` for llvm-mca: the preset's features (the x280 model otherwise lacks none we use)."""
    return ",".join(preset.llvm_target.get("mattr", ()))


def parse_mca_output(text: str) -> McaResult:
    """``Iterations``/``Total Cycles``/``Block RThroughput``/``Instructions`` of llvm-mca's summary."""
    fields = {}
    for key in ("Iterations", "Instructions", "Total Cycles", "Block RThroughput"):
        match = re.search(rf"^{key}:\s+([0-9.]+)", text, re.M)
        if match is None:
            raise BitqError(f"llvm-mca output has no '{key}:' line (not an llvm-mca summary?)")
        fields[key] = float(match.group(1))
    iterations = fields["Iterations"]
    return McaResult(fields["Total Cycles"] / iterations, fields["Block RThroughput"],
                     int(fields["Instructions"] / iterations))


@functools.lru_cache(maxsize=4096)
def run_mca(asm: str, triple: str, cpu: str, mattr: str = "") -> McaResult:
    """Simulate ``asm`` (instruction lines; labels allowed) on ``cpu`` for :data:`MCA_ITERATIONS`."""
    cmd = [mca_executable(), f"-mtriple={triple}", f"-mcpu={cpu}", f"-iterations={MCA_ITERATIONS}"]
    if mattr:
        cmd.append(f"-mattr={mattr}")
    done = subprocess.run(cmd, input=asm, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["(no message)"])[0]
        raise BitqError(f"llvm-mca -mcpu={cpu} failed: {first}")
    return parse_mca_output(done.stdout)


def split_kernels(asm: str) -> dict[str, list[str]]:
    """Kernel name -> instruction/label lines of its ``NAME_compute_`` and its parallel lambdas."""
    kernels: dict[str, list[str]] = {}
    current = None
    for line in asm.splitlines():
        typed = _FUNC_TYPE.match(line)
        if typed:
            name = typed.group(1)
            if name.endswith("_compute_"):
                current = name[: -len("_compute_")]
                kernels[current] = []
            elif not name.startswith(".L__tvm_parallel_lambda"):
                current = None  # the packed-API wrapper or a runtime helper
            continue
        if current is not None:
            # Comments: "//" (AArch64) or "# " (x86, RISC-V); "#8" is an AArch64 immediate.
            stripped = _COMMENT.sub("", line).rstrip()
            if _LABEL.match(stripped) or (stripped.strip() and not stripped.lstrip().startswith(".")):
                kernels[current].append(stripped)
    return kernels


def find_loops(lines: list[str]) -> list[AsmLoop]:
    """Loops of a function: a label and a later line that branches back to it."""
    labels = {}
    loops = []
    for i, line in enumerate(lines):
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = i
            continue
        operands = line.replace(",", " ").split()
        if operands and _is_branch(operands[0]):
            target = operands[-1]
            if target in labels:
                loops.append(AsmLoop(labels[target], i, target))
    return loops


def _is_branch(mnemonic: str) -> bool:
    return (mnemonic in ("b", "cbz", "cbnz", "tbz", "tbnz", "bnez", "beqz", "j") or mnemonic.startswith("b.")
            or re.fullmatch(r"b(eq|ne|lt|ge|ltu|geu|gt|le|gtu|leu)", mnemonic) is not None
            or re.fullmatch(r"j[a-z]{1,3}", mnemonic) is not None)


def innermost(loops: list[AsmLoop]) -> list[AsmLoop]:
    """Loops that contain no other loop."""
    return [lp for lp in loops if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in loops)]


def parent(loop: AsmLoop, loops: list[AsmLoop]) -> AsmLoop | None:
    """The smallest loop strictly around ``loop``, or None."""
    around = [o for o in loops if o is not loop and o.start <= loop.start and loop.end <= o.end]
    return min(around, key=lambda o: o.end - o.start, default=None)


def mac_lanes(line: str, vlen_bits: int, vl: int | None) -> int:
    """Multiply-accumulates one instruction performs (0 for anything else).

    ``vl`` is the RVV vector length in force (elements), from the last ``vsetvli`` before it.
    """
    parts = line.split(None, 1)
    if not parts:
        return 0
    op, rest = parts[0], parts[1] if len(parts) > 1 else ""
    if op in ("sdot", "udot", "usdot"):
        return 16 if ".4s" in rest else 8
    if op in ("smmla", "ummla", "usmmla"):
        return 32
    if op in ("fmla", "mla", "smlal", "smlal2", "umlal", "umlal2", "smull", "smull2", "umull", "umull2"):
        arrangement = _SIMD_ARRANGEMENT.search(rest)
        return int(arrangement.group(1)) if arrangement else 1
    if op in ("fmadd", "madd", "smaddl"):
        return 1
    if op.startswith(("vpdpbusd", "vpdpwssd")):
        return {"zmm": 64, "ymm": 32, "xmm": 16}.get(_x86_width(rest), 0) // (1 if "bus" in op else 2)
    if op.startswith("vpmaddwd"):
        return {"zmm": 32, "ymm": 16, "xmm": 8}.get(_x86_width(rest), 0)
    if re.fullmatch(r"vfn?m(add|sub)(132|213|231)ps", op):
        return {"zmm": 16, "ymm": 8, "xmm": 4}.get(_x86_width(rest), 0)
    if re.fullmatch(r"vfn?m(add|sub)(132|213|231)ss", op):
        return 1
    if re.fullmatch(r"v(f?w?macc(su|us|u)?|fmadd|wmul(su|u)?|fwmul)\.v[vf]", op.replace(".vx", ".vv")):
        return vl or 0
    if op in ("mul", "mulw", "fmadd.s", "fmadd.d"):
        return 1
    return 0


def _x86_width(rest: str) -> str:
    match = re.search(r"%(zmm|ymm|xmm)", rest)
    return match.group(1) if match else ""


def rvv_vl(line: str, vlen_bits: int) -> int | None:
    """Elements per vector op set by a ``vsetvli``/``vsetivli`` line, else None."""
    match = _VSET.match(line)
    if not match:
        return None
    immediate, avl, sew, fractional, lmul = match.groups()
    vlmax = vlen_bits * int(lmul) // int(sew) if not fractional else vlen_bits // (int(lmul) * int(sew))
    return min(int(avl), vlmax) if immediate else vlmax


def trip_count(lines: list[str], loop: AsmLoop) -> int | None:
    """Constant trip count of a count-down loop (``mov wN, #C`` ... ``subs wN, wN, #1``/``addi aN, aN, -1``).

    None when the pattern is not there (the caller then prices the hot loop alone).
    """
    for line in lines[loop.start:loop.end]:
        ops = line.replace(",", " ").split()
        if len(ops) == 4 and ((ops[0] == "subs" and ops[3] == "#1") or (ops[0] == "addi" and ops[3] == "-1")) \
                and ops[1] == ops[2]:
            reg = ops[1]
            alias = {reg, "w" + reg[1:], "x" + reg[1:]}
            for before in reversed(lines[:loop.start]):
                b = before.replace(",", " ").split()
                if len(b) == 3 and b[0] in ("mov", "li") and b[1] in alias:
                    value = b[2].lstrip("#")
                    return int(value, 0) if re.fullmatch(r"-?(0x)?[0-9a-f]+", value) else None
                if len(b) > 1 and b[1] in alias:
                    return None  # the counter is computed, not a constant
    return None


def loop_body(lines: list[str], loop: AsmLoop, skip: AsmLoop | None = None) -> str:
    """The instructions of ``loop`` (without the lines of the inner loop ``skip``), as llvm-mca input."""
    body = [line for i, line in enumerate(lines[loop.start:loop.end + 1], loop.start)
            if not _LABEL.match(line) and not (skip is not None and skip.start <= i <= skip.end)]
    return "\n".join(body) + "\n"
