"""Where a Pallas kernel runs: compiled for the GPU, or in the Pallas interpreter everywhere else."""

from __future__ import annotations

import contextlib
import threading

import jax

_compiled = threading.local()


@contextlib.contextmanager
def compiled_kernels():
    """Within: `interpret=None` means compiled kernels on any backend. For lowering a program for CUDA on a host
    without a GPU (`python -m bench compile-kernels`); such a program cannot run on that host. JAX's caches are
    cleared on entry and exit: a wrapper traced outside with `interpret=None` would otherwise be reused inside."""
    before = getattr(_compiled, "on", False)
    jax.clear_caches()
    _compiled.on = True
    try:
        yield
    finally:
        _compiled.on = before
        jax.clear_caches()


def resolve_interpret(interpret: bool | None) -> bool:
    """The `interpret` flag of every kernel wrapper: None means interpret unless the default backend is a GPU.

    Called at trace time inside the jitted wrappers, so the choice is made once per compiled program. The
    kernels lower only for CUDA GPUs (Triton); on CPU (tests, CI) only the interpreter runs them.
    """
    if interpret is None:
        return not getattr(_compiled, "on", False) and jax.default_backend() != "gpu"
    if not isinstance(interpret, bool):
        raise ValueError(
            f"interpret must be True, False or None (None: interpret unless the default backend is "
            f"a GPU). Got {interpret!r}"
        )
    return interpret
