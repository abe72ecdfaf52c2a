"""Compiles Triton IR files for a CUDA target with the `triton` package alone (no GPU, no JAX): the second half of
`python -m bench compile-kernels`, run as its own process, possibly by another Python that has triton.

    python bench/triton_compile_worker.py DIR [--arch 90]

For each DIR/NAME.ttir with its DIR/NAME.json ({"num_warps": W, "num_stages": S}), writes NAME.ptx and NAME.cubin
when the compile succeeds, and prints one JSON line per file: name, ok, error (the first lines of the compiler's
message), shared (bytes of shared memory), registers and stack (bytes a thread spills; from `cuobjdump`, when the
triton package ships it), atomics and barriers (PTX instruction counts).

Imports nothing of this project: the Python it runs under needs only `pip install triton`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import warnings


def _resource_usage(cubin_path: str, cuobjdump: str) -> dict:
    if not os.path.exists(cuobjdump):
        return {}
    out = subprocess.run([cuobjdump, "--dump-resource-usage", cubin_path], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    return {"registers": int(regs.group(1)) if regs else None, "stack": int(stack.group(1)) if stack else None}


def compile_one(path: str, arch: int, cuobjdump: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    name = os.path.basename(path)[: -len(".ttir")]
    with open(path[: -len(".ttir")] + ".json") as f:
        meta = json.load(f)
    options = {"num_warps": meta["num_warps"], "num_stages": meta["num_stages"]}
    try:
        kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # a compile error is the finding, reported per kernel
        lines = [ln for ln in str(e).splitlines() if ln.strip()][:4] or [type(e).__name__]
        return {"name": name, "ok": False, "error": " / ".join(lines)}
    ptx = kernel.asm["ptx"]
    base = path[: -len(".ttir")]
    with open(base + ".ptx", "w") as f:
        f.write(ptx)
    result = {
        "name": name,
        "ok": True,
        "shared": int(kernel.metadata.shared),
        "atomics": len(re.findall(r"\batom\.", ptx)),
        "barriers": len(re.findall(r"\bbar\.sync\b", ptx)),
    }
    if "cubin" in kernel.asm:
        with open(base + ".cubin", "wb") as f:
            f.write(kernel.asm["cubin"])
        result.update(_resource_usage(base + ".cubin", cuobjdump))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="directory of NAME.ttir + NAME.json files")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an integer (default 90: H100)")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default, stated so it does not warn
    warnings.filterwarnings("ignore")
    try:
        import triton
    except ImportError:
        print(json.dumps({"error": f"no triton package in {sys.executable} (pip install triton)"}))
        return 3
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    print(json.dumps({"triton": triton.__version__}), flush=True)
    for path in sorted(glob.glob(os.path.join(args.dir, "*.ttir"))):
        print(json.dumps(compile_one(path, args.arch, cuobjdump)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
