"""What the compiler emitted for the sparse-MLP Pallas kernels: PTX loads by width, ptxas registers and spills,
SASS loads, launches, and optionally ncu counters, for one configuration.

    python -m tools.ptx_report [--shape opt-13b] [--batch 1] [--density 0.1] [--variant auto] [--ncu]
                               [--keep DIR] [--out FILE.md]

A developer's evidence tool, run from the repository root on the GPU machine; it reads compiler output
whose form depends on the jaxlib (below), so it lives in tools/, outside the installed package. Issue 3
asks that a missed floor target be explained with evidence. This collects it (GPU only; about half a
minute, a minute more with --ncu):

1. A worker subprocess (this module with --worker, so XLA_FLAGS=--xla_dump_to=... is set before its jax
   starts) lowers, compiles and runs `sparse_mlp` once. It keeps the PTX three ways, since where it lands
   depends on the jaxlib: the PTX jaxlib's Triton compiler returns while pallas_call lowers (jaxlib > 0.10.2
   compiles Pallas kernels itself and hands XLA the PTX inside an opaque custom call), every dumped file
   holding `.entry` (jaxlib <= 0.10.2: XLA compiles the Triton IR into the module's PTX), and the PTX
   decoded from the custom calls' opaque config in the lowered StableHLO. It also writes the optimized HLO,
   whose ENTRY instructions are the program's launches.
2. The kernels are the PTX `.entry` functions named like the pallas_calls of the traced op
   (`name=` in kernels/sparse_mlp.py: sparse_mlp_fc1, sparse_mlp_fc2, ...); all entries if none match.
   Per kernel: global/shared loads, stores, atomics and cp.async by instruction and by bytes per
   instruction (a 16-byte `ld.global.v4.b32` is what a bandwidth-bound load wants), threads, registers
   and shared memory declared.
3. `ptxas -arch=<the PTX's target> -v` (when on PATH): registers, spills, stack, shared memory per kernel;
   its cubin through `cuobjdump -sass` (or `nvdisasm`): SASS LDG/STG/... counts by width (LDG.E.128 = 16 B).
4. `--ncu` (when on PATH): the worker again under `ncu --csv --clock-control none` filtered to the Pallas
   kernels (one call): time, DRAM bytes read and % of peak, global-load sectors per request (16 = fully
   coalesced 16-byte loads), registers, grid, block, active warps; then once per kernel under ncu's source
   page for its SASS, whose memory instructions are counted by width. On jax 0.11 (GPU machine, 2026-11-25)
   no PTX of the Pallas kernels is dumped anywhere, so this is where the SASS comes from.

Counts are static (instructions in the code, not executed). A missing tool or dump is reported in the result
and the rest still runs. With no PTX and no --ncu, or with no GPU (or --interpret), the command says why and
exits non-zero. Results: markdown + JSON under bench/results/ (or --out), with card, date, command, commit.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import card_slug, log, provenance, to_markdown, to_text, write_results
from bench.kernels_mlp import PALLAS_VARIANTS, SHAPES, floor_bytes, k_for, parse_shape, plan_summary
from kernels.sparse_mlp import plan_sparse_mlp, sparse_mlp

REPO_ROOT = Path(__file__).resolve().parents[1]
NCU_METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
    "launch__registers_per_thread",
    "launch__grid_size",
    "launch__block_size",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
)
WORKER_NO_GPU = 3  # the worker's exit code when jax has no GPU backend

# ----------------------------------------------------------------------------------------------
# PTX parsing (pure text; tested on CPU).
# ----------------------------------------------------------------------------------------------

_ENTRY_RE = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(")
_TYPE_BYTES = {"8": 1, "16": 2, "32": 4, "64": 8, "128": 16}
_STATEMENT_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)")


def ptx_entries(text: str) -> dict[str, str]:
    """name -> the `.entry` function's text, from its name through its closing brace."""
    entries = {}
    for m in _ENTRY_RE.finditer(text):
        open_brace = text.find("{", m.end())
        if open_brace < 0:
            continue
        depth, i = 0, open_brace
        while i < len(text):  # Bodies nest braces (inline-asm scopes, vector operands); they balance.
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        entries[m.group(1)] = text[m.start() : i + 1]
    return entries


def memory_class(mnemonic: str) -> str | None:
    """ld.global / st.global / ld.shared / st.shared / atom / red / cp.async, or None for other opcodes."""
    parts = mnemonic.split(".")
    if parts[0] == "cp" and len(parts) > 1 and parts[1] == "async":
        return "cp.async"
    if parts[0] in ("atom", "red"):
        return parts[0]
    if parts[0] in ("ld", "st"):
        if "global" in parts:
            return f"{parts[0]}.global"
        if any(p.startswith("shared") for p in parts):
            return f"{parts[0]}.shared"
    return None


def access_bytes(mnemonic: str, operands: str = "") -> int | None:
    """Bytes one thread moves with this instruction: vector count x type size (cp.async: its size operand)."""
    parts = mnemonic.split(".")
    if parts[:2] == ["cp", "async"]:
        sizes = re.findall(r"\]\s*,\s*(0x[0-9a-fA-F]+|\d+)", operands)
        return int(sizes[0], 0) if sizes else None
    vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v[248]", p)), 1)
    size = next((_TYPE_BYTES[p[1:]] for p in reversed(parts) if re.fullmatch(r"[bufs](8|16|32|64|128)", p)), None)
    return vector * size if size else None


def statements(body: str):
    """(mnemonic, operands) of each PTX instruction, comments dropped, predicates skipped."""
    for line in body.splitlines():
        for stmt in line.split("//")[0].split(";"):
            m = _STATEMENT_RE.match(stmt)
            if m:
                yield m.group(1), stmt[m.end() :]


def count_memory_ops(body: str) -> dict[str, dict]:
    """Per memory class: instruction counts by full mnemonic and by bytes per instruction."""
    out: dict[str, dict] = {}
    for mnemonic, operands in statements(body):
        cls = memory_class(mnemonic)
        if cls is None:
            continue
        entry = out.setdefault(cls, {"total": 0, "by_mnemonic": {}, "by_bytes": {}})
        entry["total"] += 1
        entry["by_mnemonic"][mnemonic] = entry["by_mnemonic"].get(mnemonic, 0) + 1
        width = str(access_bytes(mnemonic, operands) or "?")
        entry["by_bytes"][width] = entry["by_bytes"].get(width, 0) + 1
    return out


def declared_registers(body: str) -> dict[str, int]:
    """Virtual registers declared per PTX type (`.reg .b32 %r<57>;` -> b32: 57); ptxas allocates the real ones."""
    regs: dict[str, int] = {}
    for kind, count in re.findall(r"\.reg\s+\.(\w+)\s+%\w+<(\d+)>", body):
        regs[kind] = regs.get(kind, 0) + int(count)
    return regs


def declared_shared(text: str) -> list[dict]:
    """`.shared` arrays: name, bytes (None for a dynamic `[]` array, sized at launch)."""
    out = []
    for kind, name, count in re.findall(r"\.shared\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+(\w+)\[(\d*)\]", text):
        size = _TYPE_BYTES.get(re.sub(r"\D", "", kind) or "8", 1)
        out.append({"name": name, "bytes": int(count) * size if count else None})
    return out


def threads_per_block(body: str) -> int | None:
    m = re.search(r"\.(?:maxntid|reqntid)\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", body)
    if not m:
        return None
    n = 1
    for g in m.groups():
        n *= int(g or 1)
    return n


def ptx_target(text: str) -> str:
    m = re.search(r"^\s*\.target\s+(sm_\w+)", text, re.M)
    return m.group(1) if m else "sm_90"


def summarize_entry(body: str) -> dict:
    return {
        "threads": threads_per_block(body),
        "registers_declared": declared_registers(body),
        "shared_declared": declared_shared(body),
        "memory": count_memory_ops(body),
    }


def match_kernels(entries, names) -> tuple[list[str], bool]:
    """Entries named like a pallas_call (exactly, or with a prefix/suffix the compiler added); all if none."""
    chosen = [e for e in entries if any(n == e or n in e for n in names)]
    return (chosen, True) if chosen else (list(entries), False)


# ----------------------------------------------------------------------------------------------
# ptxas, SASS, HLO and ncu output parsing (pure text; tested on CPU).
# ----------------------------------------------------------------------------------------------


def parse_ptxas_info(text: str) -> dict[str, dict]:
    """`ptxas -v` output -> per function: registers, spill store/load bytes, stack, smem, barriers."""
    out: dict[str, dict] = {}
    current = None
    fields = {
        "registers": r"Used (\d+) registers",
        "spill_stores": r"(\d+) bytes spill stores",
        "spill_loads": r"(\d+) bytes spill loads",
        "stack_bytes": r"(\d+) bytes stack frame",
        "smem_bytes": r"(\d+) bytes smem",
        "barriers": r"used (\d+) barriers",
    }
    for line in text.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for)\s+'?([\w$]+)'?", line)
        if m:
            current = m.group(1)
            out.setdefault(current, {})
            continue
        if current is None:
            continue
        for key, pattern in fields.items():
            found = re.search(pattern, line)
            if found:
                out[current][key] = int(found.group(1))
    return out


_SASS_MEMORY = ("LDG", "STG", "LDGSTS", "ATOMG", "ATOM", "RED", "REDG", "LDS", "STS", "LDSM", "UTMALDG")


def sass_bytes(opcode: str) -> int:
    """Bytes per thread of a SASS load/store: .128 -> 16, .64 -> 8, .U16/.S16 -> 2, .U8/.S8 -> 1, else 4."""
    mods = opcode.split(".")[1:]
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return size
    return 4


def count_sass(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump -sass / nvdisasm output -> per function: memory opcode (with modifiers) -> count."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function\s*:\s*([\w$]+)", line) or re.match(r"^\s*\.text\.([\w$]+):", line)
        if m:
            current = m.group(1)
            out.setdefault(current, {})
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if current is None or not m:
            continue
        opcode = m.group(1)
        if opcode.split(".")[0] in _SASS_MEMORY:
            out[current][opcode] = out[current].get(opcode, 0) + 1
    return out


def sass_by_width(opcodes: dict[str, int]) -> dict[str, dict[str, int]]:
    """LDG.E.128: 3, LDG.E: 2 -> {LDG: {"16": 3, "4": 2}}."""
    out: dict[str, dict[str, int]] = {}
    for opcode, n in opcodes.items():
        by = out.setdefault(opcode.split(".")[0], {})
        key = str(sass_bytes(opcode))
        by[key] = by.get(key, 0) + n
    return out


_NOT_LAUNCHES = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def hlo_computations(hlo_text: str) -> tuple[dict[str, str], str | None]:
    """Optimized HLO text -> ({computation name: body}, the ENTRY computation's name)."""
    comps, entry = {}, None
    for m in re.finditer(r"^(ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S):
        comps[m.group(2)] = m.group(3)
        if m.group(1):
            entry = m.group(2)
    return comps, entry


def hlo_launches(hlo_text: str) -> list[str]:
    """The ENTRY instructions that run on the device (fusions, custom calls, copies...), looking through
    `call`s (XLA outlines command buffers, i.e. CUDA graphs, into called computations)."""
    comps, entry = hlo_computations(hlo_text)

    def launches(name: str, depth: int) -> list[str]:
        out = []
        for line in comps.get(name, "").splitlines():
            inst = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)", line)
            op = re.search(r"\b([a-z][a-z0-9_\-]*)\(", inst.group(2)) if inst else None
            if not op or op.group(1) in _NOT_LAUNCHES:
                continue
            called = re.search(r"to_apply=%?([\w.\-]+)", line)
            if op.group(1) == "call" and called and depth < 3:
                out += [f"{launch} [in call {called.group(1)}]" for launch in launches(called.group(1), depth + 1)]
                continue
            label = f"{op.group(1)} {inst.group(1)}"
            target = re.search(r'custom_call_target="([^"]+)"', line)
            kname = re.search(r'\bname\\?"?\s*[=:]\s*\\?"([\w$.\-]+)', line)
            if target:
                label += f" ({target.group(1)}{': ' + kname.group(1) if kname else ''})"
            out.append(label)
        return out

    return launches(entry, 0) if entry else []


def parse_ncu_csv(text: str) -> list[dict]:
    """`ncu --csv --page details` output (mixed with the program's and ncu's own lines) -> one dict a launch:
    id, kernel, grid, block, metrics {name: {"value": float or str, "unit": str}}."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    rows = csv.DictReader(io.StringIO("\n".join(ln for ln in lines[start:] if not ln.startswith("=="))))
    launches: dict[str, dict] = {}
    for row in rows:
        if not row.get("ID") or not row.get("Metric Name"):
            continue
        launch = launches.setdefault(
            row["ID"],
            {
                "id": row["ID"],
                "kernel": row.get("Kernel Name", ""),
                "grid": row.get("Grid Size", ""),
                "block": row.get("Block Size", ""),
                "metrics": {},
            },
        )
        raw = (row.get("Metric Value") or "").strip()
        try:
            value: float | str = float(raw.replace(",", ""))
        except ValueError:
            value = raw
        launch["metrics"][row["Metric Name"]] = {"value": value, "unit": (row.get("Metric Unit") or "").strip()}
    return list(launches.values())


_TIME_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6}
_BYTES = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def metric_in(launch: dict, name: str, scale: dict | None = None) -> float | None:
    """A metric's value, converted by its unit through `scale` (e.g. to microseconds); None if absent."""
    m = launch["metrics"].get(name)
    if not m or not isinstance(m["value"], float):
        return None
    if scale is None:
        return m["value"]
    factor = scale.get(m["unit"])
    return m["value"] * factor if factor is not None else None


def ncu_summary(launch: dict) -> dict:
    """The numbers the report shows for one profiled launch."""
    us = metric_in(launch, "gpu__time_duration.sum", _TIME_US)
    read = metric_in(launch, "dram__bytes_read.sum", _BYTES)
    sectors = metric_in(launch, "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum")
    requests = metric_in(launch, "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum")
    return {
        "kernel": launch["kernel"],
        "us": us,
        "dram_read_bytes": read,
        "dram_read_gbps": read / us / 1e3 if us and read is not None else None,
        "dram_pct_peak": metric_in(launch, "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
        "sectors_per_request": sectors / requests if sectors is not None and requests else None,
        "registers": metric_in(launch, "launch__registers_per_thread"),
        "grid": metric_in(launch, "launch__grid_size"),
        "block": metric_in(launch, "launch__block_size"),
        "warps_active_pct": metric_in(launch, "sm__warps_active.avg.pct_of_peak_sustained_active"),
    }


def _unescape_mlir(s: str) -> bytes:
    """An MLIR string attribute's body: `\\\\` is a backslash, `\\XX` a hex byte, the rest literal."""
    out, i = bytearray(), 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1 : i + 2] == "\\":
            out.append(0x5C)
            i += 2
        elif s[i] == "\\" and re.fullmatch(r"[0-9A-Fa-f]{2}", s[i + 1 : i + 3]):
            out.append(int(s[i + 1 : i + 3], 16))
            i += 3
        else:
            out += s[i].encode()
            i += 1
    return bytes(out)


def _proto_strings(data: bytes, depth: int = 0):
    """Every length-delimited field of a protobuf message, recursing into those that parse as messages."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated")
            chunk = data[i : i + n]
            i += n
            yield chunk
            if depth < 4:
                try:
                    yield from list(_proto_strings(chunk, depth + 1))
                except (ValueError, IndexError):
                    pass
        else:
            raise ValueError(f"wire type {wire}")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def ptx_from_stablehlo(text: str) -> list[str]:
    """PTX inside the lowered StableHLO's Triton custom calls (jaxlib > 0.10.2: a zlib-compressed proto
    in `opaque`), by a generic protobuf walk: per call, the innermost field that holds an `.entry`."""
    found = []
    for m in re.finditer(r'opaque\s*=\s*"((?:[^"\\]|\\.)*)"', text):
        try:
            fields = list(_proto_strings(zlib.decompress(_unescape_mlir(m.group(1)))))
        except (zlib.error, ValueError, IndexError):
            continue
        holding = [chunk for chunk in fields if b".entry" in chunk and b".version" in chunk]
        if holding:  # The messages around the PTX hold it too; the string itself is the shortest.
            found.append(min(holding, key=len).decode("utf-8", "replace"))
    return found


# ----------------------------------------------------------------------------------------------
# External tools: each returns a dict with its result or an "error" text, never raises.
# ----------------------------------------------------------------------------------------------


def run_tool(cmd: list[str], timeout: float, **kwargs) -> dict:
    """stdout, stderr, rc of a command, or {"error": why} when it is missing, fails to start or times out."""
    if shutil.which(cmd[0]) is None:
        return {"error": f"{cmd[0]} is not on PATH"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except (OSError, subprocess.SubprocessError) as e:
        return {"error": f"{' '.join(cmd[:3])}...: {type(e).__name__}: {e}"}
    result = {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
    if proc.returncode != 0:
        result["error"] = f"{cmd[0]} exited {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"
    return result


def ptxas_and_sass(ptx_path: Path, workdir: Path) -> dict:
    """ptxas -v of one PTX file (per-function registers, spills) and SASS memory-opcode counts of its cubin."""
    arch = ptx_target(ptx_path.read_text())
    cubin = workdir / (ptx_path.stem + ".cubin")
    res = run_tool(["ptxas", f"-arch={arch}", "-v", "-o", str(cubin), str(ptx_path)], timeout=120)
    out: dict = {"file": ptx_path.name, "arch": arch}
    if "error" in res:
        out["ptxas_error"] = res["error"]
        return out
    out["ptxas"] = parse_ptxas_info(res["stdout"] + "\n" + res["stderr"])
    out["ptxas_raw"] = (res["stdout"] + res["stderr"])[-4000:]
    errors = []
    for cmd in (["cuobjdump", "-sass", str(cubin)], ["nvdisasm", "-c", str(cubin)]):
        dis = run_tool(cmd, timeout=120)
        if "error" not in dis and count_sass(dis["stdout"]):
            out["sass_tool"], out["sass"] = cmd[0], count_sass(dis["stdout"])
            return out
        errors.append(dis.get("error", f"{cmd[0]}: no functions in its output"))
    out["sass_error"] = "; ".join(errors)
    return out


def ncu_profile(worker_cmd: list[str], names: list[str], launch_count: int, timeout: float) -> dict:
    """The worker under ncu, filtered to the Pallas kernels; unfiltered once if the filter matched nothing."""
    base = [
        "ncu",
        "--clock-control",
        "none",
        "--csv",
        "--page",
        "details",
        "--print-units",
        "base",
        "--metrics",
        ",".join(NCU_METRICS),
        "--launch-count",
        str(launch_count),
    ]
    attempts = [["-k", "regex:" + "|".join(re.escape(n) for n in names)]] if names else []
    attempts.append([])
    notes = []
    for filt in attempts:
        res = run_tool(base + filt + worker_cmd, timeout=timeout, cwd=REPO_ROOT)
        text = res.get("stdout", "") + "\n" + res.get("stderr", "")
        launches = parse_ncu_csv(res.get("stdout", ""))
        if launches:
            return {
                "command": " ".join(base + filt) + " <worker>",
                "launches": launches,
                "notes": notes,
                "summary": [ncu_summary(launch) for launch in launches],
            }
        notes.append(
            f"{' '.join(filt) or 'unfiltered'}: "
            + (res["error"][-800:] if "error" in res else "no CSV rows; output tail: " + text[-800:])
        )
        if "error" in res and "not on PATH" in res["error"]:
            break
    return {"error": " | ".join(notes)}


_SASS_OPCODE_RE = re.compile(r"\b((?:LDG|STG|LDGSTS|ATOMG|RED|LDS|STS|LDL|STL)(?:\.[A-Z0-9_]+)*)\b")


def count_sass_opcodes(text: str) -> dict[str, int]:
    """Memory opcodes (with modifiers) anywhere in a SASS listing, e.g. ncu's source page -> counts."""
    counts: dict[str, int] = {}
    for opcode in _SASS_OPCODE_RE.findall(text):
        counts[opcode] = counts.get(opcode, 0) + 1
    return counts


def ncu_sass(worker_cmd: list[str], names: list[str], workdir: Path, timeout: float) -> dict[str, dict]:
    """Per kernel name: the SASS of its first launch from ncu's source page (raw text kept in workdir),
    its memory opcodes and their widths."""
    out = {}
    for name in names:
        cmd = [
            "ncu",
            "--clock-control",
            "none",
            "--page",
            "source",
            "--print-source",
            "sass",
            "--csv",
            "-k",
            "regex:" + re.escape(name),
            "--launch-count",
            "1",
        ]
        res = run_tool(cmd + worker_cmd, timeout=timeout, cwd=REPO_ROOT)
        text = res.get("stdout", "")
        (workdir / f"sass_{name}.txt").write_text(text + "\n" + res.get("stderr", ""))
        opcodes = count_sass_opcodes(text)
        if not opcodes:
            out[name] = {
                "error": f"{name}: no SASS memory opcodes in ncu's output "
                f"({res.get('error', 'tail: ' + (text + res.get('stderr', ''))[-600:])})"
            }
            continue
        out[name] = {"command": " ".join(cmd) + " <worker>", "opcodes": opcodes, "by_width": sass_by_width(opcodes)}
    return out


# ----------------------------------------------------------------------------------------------
# The configuration and the worker (the only part that needs a GPU).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    shape: str
    d: int
    ffn: int
    batch: int
    density: float
    variant: str

    @property
    def k(self) -> int:
        return k_for(self.density, self.ffn)

    def argv(self) -> list[str]:
        return [
            "--shape",
            self.shape,
            "--batch",
            str(self.batch),
            "--density",
            repr(self.density),
            "--variant",
            self.variant,
        ]


def pallas_calls(config: Config) -> list[dict]:
    """name, grid, num_warps, num_stages of each pallas_call the op traces to (no compile, no GPU)."""
    S, f16 = jax.ShapeDtypeStruct, jnp.float16
    shapes = (
        S((config.batch, config.d), f16),
        S((config.ffn, config.d), f16),
        S((config.ffn,), f16),
        S((config.ffn, config.d), f16),
        S((config.d,), f16),
        S((config.k,), jnp.int32),
    )
    jaxpr = jax.make_jaxpr(lambda *a: sparse_mlp(*a, **PALLAS_VARIANTS[config.variant]))(*shapes)
    found = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "pallas_call":
                params = eqn.params.get("compiler_params")
                found.append(
                    {
                        "name": eqn.params.get("name") or eqn.params["jaxpr"].debug_info.func_name,
                        "grid": list(eqn.params["grid_mapping"].grid),
                        "num_warps": getattr(params, "num_warps", None),
                        "num_stages": getattr(params, "num_stages", None),
                    }
                )
            for v in eqn.params.values():
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr.jaxpr)
    return found


class TritonCapture:
    """Keeps the PTX jaxlib's Triton compiler returns while pallas_call lowers (jaxlib > 0.10.2).

    Wraps `jax._src.lib.triton.compile`, a private API: when it is missing the other two sources remain.
    """

    def __init__(self):
        self.kernels: list[dict] = []
        self.error: str | None = None

    def install(self) -> None:
        try:
            from jax._src.lib import triton as lib

            original = lib.compile
        except (ImportError, AttributeError) as e:
            self.error = f"cannot wrap jax._src.lib.triton.compile: {type(e).__name__}: {e}"
            return

        def compile_and_keep(*args, **kwargs):
            result = original(*args, **kwargs)
            if getattr(result, "asm", None):
                self.kernels.append(
                    {
                        "ptx": result.asm,
                        "smem_bytes": getattr(result, "smem_bytes", None),
                        "num_warps": kwargs.get("num_warps"),
                        "num_stages": kwargs.get("num_stages"),
                    }
                )
            return result

        lib.compile = compile_and_keep


def worker(config: Config, outdir: Path) -> int:
    """Lower, compile and run the op once; write the PTX, StableHLO, optimized HLO and worker.json to outdir."""
    if jax.default_backend() != "gpu":
        print(
            f"error: jax backend is {jax.default_backend()!r}: PTX exists only for a CUDA GPU compile "
            "(the Pallas interpreter emits none). Run `python -m tools.ptx_report` on the GPU machine.",
            file=sys.stderr,
        )
        return WORKER_NO_GPU
    capture = TritonCapture()
    capture.install()
    rng = np.random.default_rng(0)
    # Host-made inputs: device_put is a copy, not a kernel, so ncu sees only the op's own launches.
    weight = lambda *shape: (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16)  # noqa: E731
    args = [
        jax.device_put(a)
        for a in (
            weight(config.batch, config.d),
            weight(config.ffn, config.d),
            weight(config.ffn),
            weight(config.ffn, config.d),
            weight(config.d),
            rng.permutation(config.ffn)[: config.k].astype(np.int32),
        )
    ]
    knobs = PALLAS_VARIANTS[config.variant]
    lowered = sparse_mlp.lower(*args, **knobs)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "stablehlo.mlir").write_text(lowered.as_text())
    compiled = lowered.compile()
    (outdir / "optimized_hlo.txt").write_text(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    triton_dir = outdir / "triton"
    triton_dir.mkdir(exist_ok=True)
    for i, kernel in enumerate(capture.kernels):
        ptx = kernel.pop("ptx")
        kernel["entries"] = list(ptx_entries(ptx))
        (triton_dir / f"kernel_{i}.ptx").write_text(ptx)
    plan = plan_sparse_mlp(config.batch, config.k, config.d, jnp.float16, **knobs)
    meta = {
        "provenance": provenance(),
        "backend": jax.default_backend(),
        "plan": plan_summary(plan),
        "pallas_calls": pallas_calls(config),
        "captured": capture.kernels,
        "capture_error": capture.error,
    }
    (outdir / "worker.json").write_text(json.dumps(meta, indent=2, default=str))
    return 0


# ----------------------------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------------------------


def find_ptx_sources(workdir: Path) -> dict[str, Path]:
    """PTX files: the captured Triton ones, every dumped file holding `.entry`, the StableHLO decode."""
    sources: dict[str, Path] = {}
    for path in sorted((workdir / "worker" / "triton").glob("*.ptx")):
        sources[f"triton-compile/{path.name}"] = path
    for path in sorted((workdir / "xla_dump").rglob("*")):
        if path.is_file() and (path.suffix == ".ptx" or _holds_entry(path)):
            sources[f"xla-dump/{path.relative_to(workdir / 'xla_dump')}"] = path
    stablehlo = workdir / "worker" / "stablehlo.mlir"
    if stablehlo.exists():
        for i, ptx in enumerate(ptx_from_stablehlo(stablehlo.read_text())):
            path = workdir / f"stablehlo_kernel_{i}.ptx"
            path.write_text(ptx)
            sources[f"stablehlo-opaque/{path.name}"] = path
    return sources


def _holds_entry(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return b".entry " in f.read(4 << 20)
    except OSError:
        return False


def collect_kernels(sources: dict[str, Path], names: list[str]) -> tuple[dict, list[str], bool]:
    """Every entry of every source (first source wins a name); the ones to report; whether names matched."""
    entries: dict[str, dict] = {}
    for label, path in sources.items():
        for name, body in ptx_entries(path.read_text(errors="replace")).items():
            if name not in entries:
                entries[name] = {"source": label, **summarize_entry(body)}
    chosen, matched = match_kernels(entries, names)
    return entries, chosen, matched


def add_tool_reports(entries: dict, chosen: list[str], sources: dict[str, Path], workdir: Path) -> list[dict]:
    """ptxas + SASS once per PTX file holding a chosen kernel; results copied into those kernels."""
    files = []
    for label in dict.fromkeys(entries[name]["source"] for name in chosen):
        report = ptxas_and_sass(sources[label], workdir)
        files.append({"source": label, **{k: v for k, v in report.items() if k not in ("ptxas", "sass")}})
        for name in chosen:
            if entries[name]["source"] == label:
                entries[name]["ptxas"] = report.get("ptxas", {}).get(name)
                sass = report.get("sass", {}).get(name)
                entries[name]["sass"] = sass
                entries[name]["sass_by_width"] = sass_by_width(sass) if sass else None
    return files


def _widths(counts: dict | None) -> str:
    """{"16": 3, "4": 1} -> '3x16B 1x4B' (widest first)."""
    if not counts:
        return "-"
    widest_first = sorted(counts.items(), key=lambda kv: -int(kv[0]) if kv[0].isdigit() else 0)
    return " ".join(f"{n}x{w}B" for w, n in widest_first)


def kernel_rows(entries: dict, chosen: list[str]):
    header = [
        "kernel",
        "threads",
        "ld.global",
        "st.global",
        "atom/red",
        "cp.async",
        "ptxas regs",
        "spill st/ld B",
        "ptxas smem B",
        "Triton smem B",
        "SASS LDG",
        "SASS STG",
    ]
    body = []
    for name in chosen:
        e, mem = entries[name], entries[name]["memory"]
        px = e.get("ptxas") or {}
        sass = e.get("sass_by_width") or {}
        body.append(
            [
                name,
                str(e["threads"] or "-"),
                _widths(mem.get("ld.global", {}).get("by_bytes")),
                _widths(mem.get("st.global", {}).get("by_bytes")),
                str(sum(mem.get(c, {}).get("total", 0) for c in ("atom", "red"))),
                _widths(mem.get("cp.async", {}).get("by_bytes")),
                str(px.get("registers", "-")),
                f"{px.get('spill_stores', '-')}/{px.get('spill_loads', '-')}",
                str(px.get("smem_bytes", "-")),
                str(e.get("triton_smem_bytes", "-")),
                _widths(sass.get("LDG")),
                _widths(sass.get("STG")),
            ]
        )
    return header, body


def ncu_rows(ncu: dict):
    header = [
        "kernel",
        "us",
        "DRAM read MB",
        "GB/s",
        "DRAM % peak",
        "sectors/req",
        "regs",
        "grid",
        "block",
        "warps active %",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    body = [
        [
            s["kernel"][:40],
            fmt(s["us"], ".2f"),
            fmt(s["dram_read_bytes"] and s["dram_read_bytes"] / 1e6, ".2f"),
            fmt(s["dram_read_gbps"], ".0f"),
            fmt(s["dram_pct_peak"], ".1f"),
            fmt(s["sectors_per_request"], ".1f"),
            fmt(s["registers"], ".0f"),
            fmt(s["grid"], ".0f"),
            fmt(s["block"], ".0f"),
            fmt(s["warps_active_pct"], ".1f"),
        ]
        for s in ncu.get("summary", [])
    ]
    return header, body


def render_markdown(data: dict) -> str:
    c = data["config"]
    lines = [
        f"# Sparse-MLP kernels: what the compiler emitted - {data['card']}",
        "",
        f"- date: {data['date']}",
        f"- command: `{data['command']}`",
        f"- commit: {data['commit']}",
        f"- jax: {data['jax']}",
        f"- config: {c['shape']} (d {c['d']}, ffn {c['ffn']}), batch {c['batch']}, density {c['density']:g} "
        f"(K {c['k']}), variant {c['variant']}, fp16; plan {data['plan']}",
        f"- floor bytes (K rows of fc1_w and fc2_w_t, biases, x): {data['floor_bytes'] / 1e6:.2f} MB",
        "- pallas_calls: "
        + ", ".join(f"{p['name']} grid {p['grid']} w{p['num_warps']} s{p['num_stages']}" for p in data["pallas_calls"]),
        f"- launches in the optimized HLO ENTRY ({len(data['launches'])}): " + ("; ".join(data["launches"]) or "-"),
        f"- PTX sources: {', '.join(data['ptx_sources']) or 'none'}",
        "",
    ]
    if not data["names_matched"]:
        lines += ["**No PTX entry matched the pallas_call names; all entries are shown.**", ""]
    lines += [
        "## PTX / ptxas / SASS (static instruction counts; `NxWB` = N instructions moving W bytes a thread)",
        "",
        to_markdown(*kernel_rows(data["entries"], data["kernels"])),
        "",
    ]
    others = sorted(set(data["entries"]) - set(data["kernels"]))
    if others:
        lines += [f"Other entries in the PTX (XLA's own kernels; counts in the JSON): {', '.join(others)}", ""]
    lines += ["## ncu (one call; caches flushed before each kernel, clocks left as the card runs them)", ""]
    if "ncu" not in data:
        lines += ["(not run; pass --ncu)", ""]
    elif "error" in data["ncu"]:
        lines += [f"ncu failed: {data['ncu']['error'][:1500]}", ""]
    else:
        lines += [
            to_markdown(*ncu_rows(data["ncu"])),
            "",
            "sectors/req: 32-byte sectors per global-load request of a warp (LSU loads; cp.async / "
            "LDGSTS are not in it); 16 means fully coalesced 16-byte loads, 4 means 4-byte ones.",
            "",
        ]
    sass = {k: v for k, v in data.get("ncu_sass", {}).items() if "opcodes" in v}
    if sass:
        lines += [
            "## SASS memory instructions (ncu source page, static counts; `NxWB` = N instructions moving W "
            "bytes a thread: LDG.E.128 = 16 B)",
            "",
            to_markdown(
                ["kernel", "LDG", "STG", "LDGSTS", "shared LDS/STS", "local LDL/STL"],
                [
                    [
                        name,
                        _widths(v["by_width"].get("LDG")),
                        _widths(v["by_width"].get("STG")),
                        _widths(v["by_width"].get("LDGSTS")),
                        f"{_widths(v['by_width'].get('LDS'))} / {_widths(v['by_width'].get('STS'))}",
                        f"{_widths(v['by_width'].get('LDL'))} / {_widths(v['by_width'].get('STL'))}",
                    ]
                    for name, v in sass.items()
                ],
            ),
            "",
        ]
    problems = [f"- {k}: {v}" for k, v in data["problems"].items() if v]
    if problems:
        lines += ["## What could not be collected", "", *problems, ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.ptx_report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shape", default="opt-13b", help="opt-6.7b, opt-13b, opt-30b, opt-66b or DxFFN")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument(
        "--variant",
        default="auto",
        choices=list(PALLAS_VARIANTS),
        help="a Pallas variant (knob setting) of bench/kernels_mlp.py (default auto)",
    )
    p.add_argument("--ncu", action="store_true", help="also profile one call under ncu (when on PATH)")
    p.add_argument("--ncu-launch-count", type=int, default=8, help="ncu --launch-count (default 8)")
    p.add_argument("--keep", default=None, help="keep the dumps, PTX and cubins in this directory")
    p.add_argument(
        "--out",
        default=None,
        help="markdown path (JSON beside it); default "
        "bench/results/ptx_sparse_mlp_<shape>_b<B>_<density>_<variant>_<card>_<date>.md",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for each subprocess (default 300)")
    p.add_argument("--interpret", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def parse_config(args) -> Config:
    try:
        shape, d, ffn = parse_shape(args.shape)
    except ValueError:
        raise ValueError(
            f"--shape takes one of {sorted(SHAPES)} or DxFFN (e.g. 4096x16384). Got {args.shape!r}"
        ) from None
    if not 1 <= args.batch <= 128:
        raise ValueError(f"--batch must be in [1, 128]. Got {args.batch}")
    if not 0.0 < args.density <= 1.0:
        raise ValueError(f"--density must be in (0, 1]. Got {args.density}")
    return Config(shape, d, ffn, args.batch, args.density, args.variant)


def worker_command(config: Config, outdir: Path) -> list[str]:
    return [sys.executable, "-m", "tools.ptx_report", "--worker", str(outdir), *config.argv()]


def run_worker(config: Config, workdir: Path, timeout: float) -> dict:
    """The worker with XLA dumping into workdir/xla_dump: its worker.json, or {"error": ...}."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={workdir / 'xla_dump'}").strip()
    try:
        proc = subprocess.run(
            worker_command(config, workdir / "worker"),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"the worker did not finish in {timeout:g} s"}
    if proc.returncode == WORKER_NO_GPU:  # Its last line says why.
        last = (proc.stderr.strip().splitlines() or ["the worker found no GPU"])[-1]
        return {"error": last.removeprefix("error: ")}
    if proc.returncode != 0:
        return {"error": f"the worker exited {proc.returncode}:\n{proc.stderr[-3000:]}"}
    return json.loads((workdir / "worker" / "worker.json").read_text())


def evidence(config: Config, meta: dict, sources: dict[str, Path], workdir: Path) -> dict:
    """Everything but ncu: kernels' PTX counts, ptxas and SASS, launches, and what could not be collected."""
    entries, chosen, matched = collect_kernels(sources, [p["name"] for p in meta["pallas_calls"]])
    for kernel in meta["captured"]:  # Triton's dynamic shared memory, which ptxas -v does not count.
        for name in kernel.get("entries", []):
            if name in entries:
                entries[name]["triton_smem_bytes"] = kernel.get("smem_bytes")
    tool_files = add_tool_reports(entries, chosen, sources, workdir)
    hlo = workdir / "worker" / "optimized_hlo.txt"
    return {
        **meta["provenance"],
        "config": {**dataclasses.asdict(config), "k": config.k},
        "floor_bytes": floor_bytes(config.batch, config.k, config.d, 2),
        "plan": meta["plan"],
        "pallas_calls": meta["pallas_calls"],
        "triton_captured": meta["captured"],
        "launches": hlo_launches(hlo.read_text()) if hlo.exists() else [],
        "ptx_sources": list(sources),
        "names_matched": matched,
        "kernels": chosen,
        "entries": entries,
        "tool_files": tool_files,
        "problems": {
            "triton capture": meta["capture_error"],
            "ptxas": "; ".join(f["ptxas_error"] for f in tool_files if "ptxas_error" in f),
            "sass": "; ".join(f["sass_error"] for f in tool_files if "sass_error" in f),
        },
    }


def print_summary(data: dict) -> None:
    print()
    print(to_text(*kernel_rows(data["entries"], data["kernels"])))
    if data.get("ncu", {}).get("summary"):
        print()
        print(to_text(*ncu_rows(data["ncu"])))
    for key, problem in data["problems"].items():
        if problem:
            print(f"note: {key}: {problem[:500]}")


def report(args, config: Config, workdir: Path, argv) -> int:
    """Worker, PTX sources, evidence, optional ncu, then the table and the result files."""
    log(
        f"ptx: {config.shape} b{config.batch} density {config.density:g} (K {config.k}) {config.variant}; "
        f"worker with XLA dump in {workdir}"
    )
    meta = run_worker(config, workdir, args.timeout)
    if "error" in meta:
        print(f"error: {meta['error']}", file=sys.stderr)
        return 1
    sources = find_ptx_sources(workdir)
    no_ptx = None
    if not sources:
        # jax 0.11's XLA compiles the Triton IR itself and dumps no PTX of it: the SASS then comes from ncu.
        no_ptx = (
            f"no PTX found: nothing from jaxlib's Triton compile ({meta['capture_error'] or 'no kernels'}), "
            f"no file holding `.entry` under {workdir / 'xla_dump'}, nothing in the StableHLO"
        )
        log(f"ptx: {no_ptx}" + ("; continuing with ncu" if args.ncu else ""))
        if not args.ncu:
            print(f"error: {no_ptx}; pass --ncu to read the kernels' SASS through ncu instead", file=sys.stderr)
            return 1
    data = evidence(config, meta, sources, workdir)
    data["problems"]["ptx"] = no_ptx
    data["command"] = "python -m tools.ptx_report " + " ".join(argv)
    if args.ncu:
        log("ptx: profiling one call under ncu ...")
        names = [p["name"] for p in meta["pallas_calls"]]
        data["ncu"] = ncu_profile(
            worker_command(config, workdir / "ncu_worker"), names, args.ncu_launch_count, args.timeout
        )
        data["problems"]["ncu"] = data["ncu"].get("error")
        log("ptx: the kernels' SASS through ncu's source page ...")
        data["ncu_sass"] = ncu_sass(worker_command(config, workdir / "ncu_sass_worker"), names, workdir, args.timeout)
        data["problems"]["ncu sass"] = "; ".join(v["error"] for v in data["ncu_sass"].values() if "error" in v)
    print_summary(data)
    stem = (
        f"ptx_sparse_mlp_{config.shape}_b{config.batch}_{config.density:g}_{config.variant}_"
        f"{card_slug(data['card'])}_{data['date']}"
    )
    path = write_results(stem, render_markdown(data), json.loads(json.dumps(data, default=str)), args.out)
    print(f"wrote {path} and {path.with_suffix('.json').name}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        config = parse_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.worker:
        return worker(config, Path(args.worker))
    if args.interpret:
        print(
            "error: --interpret runs the Pallas interpreter, which compiles no PTX; run `python -m tools.ptx_report` "
            "without it on a GPU machine",
            file=sys.stderr,
        )
        return 2
    if args.keep:
        workdir = Path(args.keep).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        return report(args, config, workdir, argv)
    with tempfile.TemporaryDirectory(prefix="bench_ptx_") as tmp:
        return report(args, config, Path(tmp), argv)


if __name__ == "__main__":
    sys.exit(main())
