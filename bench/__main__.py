"""python -m bench {generate,kernels,select,profile,compile-kernels,allreduce,convert-memory,train-stream} ...
(each has --help)"""

from __future__ import annotations

import sys

USAGE = """usage: python -m bench {generate,kernels,select,profile,compile-kernels,allreduce,convert-memory,
                       train-stream} [options]

  generate            decode latency: JAX dense and sparse (fixed rows, lossless, predicted) vs HF eager vs
                      the bandwidth floor
  kernels --op mlp    the index-list sparse-MLP Pallas kernels vs dense XLA, an XLA gather, and the floor
  kernels --op masked-mlp  the row-masked MLP kernels (threshold selection fused into fc1) vs the index-list
                      path, per layer
  kernels --op attention  the decode-attention Pallas kernel vs XLA
  kernels --op head-sparse  q/k/v and out_proj of the chosen heads (Pallas) vs XLA dense and gathered
  select              what choosing a decode step's neurons costs: predictor matmuls by rank, top-K
                      selection alternatives (GPU)
  profile             kernel-by-kernel time of the compiled decode program (GPU, from a profiler trace)
  compile-kernels     every Pallas kernel of a decode program compiled for an H100 by Triton on any host (no
                      GPU): compile errors, registers, spills, shared memory, programs per SM
  allreduce           per-call latency of the [batch, d] all-reduce tensor-parallel decoding makes twice a layer,
                      chained under shard_map, optionally under XLA / NCCL flag variants
  convert-memory      peak host memory of converting a random-weight HF checkpoint of a real shape
  train-stream        streaming predictor training (python -m train --store stream) on a random-weight model of
                      a real shape: tokens/s, peak device and host memory, disk written

Run `python -m bench COMMAND --help` for a command's options. Results go to bench/results/.
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "generate":
        from bench.generate import main as run

        return run(rest)
    if command == "select":
        from bench.select import main as run

        return run(rest)
    if command == "profile":
        from bench.profile_decode import main as run

        return run(rest)
    if command == "compile-kernels":
        from bench.compile_kernels import main as run

        return run(rest)
    if command == "allreduce":
        from bench.allreduce import main as run

        return run(rest)
    if command == "convert-memory":
        from bench.convert_memory import main as run

        return run(rest)
    if command == "train-stream":
        from bench.train_stream import main as run

        return run(rest)
    if command == "kernels":
        if "--op" in rest:
            i = rest.index("--op")
            op = rest[i + 1] if i + 1 < len(rest) else ""
            rest = rest[:i] + rest[i + 2 :]
        else:
            op = "mlp"
        if op == "attention":
            from bench.kernels_attention import main as run

            return run(rest) or 0
        if op == "head-sparse":
            from bench.kernels_head_sparse import main as run

            return run(rest) or 0
        if op == "masked-mlp":
            from bench.kernels_masked_mlp import main as run

            return run(rest) or 0
        if op != "mlp":
            print(f"error: unknown --op {op!r}; available: mlp, masked-mlp, attention, head-sparse", file=sys.stderr)
            return 2
        from bench.kernels_mlp import main as run

        return run(rest) or 0
    print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
