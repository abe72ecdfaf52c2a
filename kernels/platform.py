"""Where a Pallas kernel runs: compiled for the GPU, or in the Pallas interpreter everywhere else."""

from __future__ import annotations

import jax


def resolve_interpret(interpret: bool | None) -> bool:
    """The `interpret` flag of every kernel wrapper: None means interpret unless the default backend is a GPU.

    Called at trace time inside the jitted wrappers, so the choice is made once per compiled program. The
    kernels lower only for CUDA GPUs (Triton); on CPU (tests, CI) only the interpreter runs them.
    """
    if interpret is None:
        return jax.default_backend() != "gpu"
    if not isinstance(interpret, bool):
        raise ValueError(
            f"interpret must be True, False or None (None: interpret unless the default backend is "
            f"a GPU). Got {interpret!r}"
        )
    return interpret
