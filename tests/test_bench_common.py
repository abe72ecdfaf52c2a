"""bench/common.py: the chained timer every kernel benchmark uses."""

import jax.numpy as jnp

from bench.common import time_chained


def test_time_chained_runs_each_call_once_in_order():
    """The first call, then steps x calls_per_step calls, each fed the previous output; operands reach every call."""
    calls_per_step = 3

    def body(x, operands):
        scale, offset = operands
        for _ in range(calls_per_step):
            x = x * scale + offset
        return x

    timing = time_chained(
        body,
        jnp.float32(1.0),
        (jnp.float32(1.0), jnp.float32(2.0)),
        steps=5,
        repeats=2,
        calls_per_step=calls_per_step,
        first=lambda x, ops: x + 10.0,
    )
    assert timing.calls == 1 + 5 * 3
    assert float(timing.first) == 11.0
    assert float(timing.last) == 11.0 + 2.0 * 15
    assert timing.seconds > 0 and timing.compile_s > 0


def test_time_chained_without_a_first_call():
    timing = time_chained(lambda x, ops: x + ops, jnp.zeros((2,)), jnp.ones((2,)), steps=4, repeats=1)
    assert timing.calls == 4
    assert timing.first.tolist() == [0.0, 0.0] and timing.last.tolist() == [4.0, 4.0]


def test_invoked_command_names_the_module_that_ran():
    from bench.common import invoked_command

    assert invoked_command(["/repo/bench/__main__.py", "generate", "--shape", "opt-6.7b"], {}) == (
        "python -m bench generate --shape opt-6.7b"
    )
    assert (
        invoked_command(["/repo/bench/generate.py", "--shape", "tiny"], {}) == "python -m bench.generate --shape tiny"
    )
    assert invoked_command(["tools/x.py", "-q"], {}) == "python tools/x.py -q"
    assert invoked_command([], {}) == ""
    flags = {"XLA_FLAGS": "--xla_gpu_enable_pdl=true", "HOME": "/root"}
    assert invoked_command(["bench/__main__.py", "generate"], flags) == (
        "XLA_FLAGS=--xla_gpu_enable_pdl=true python -m bench generate"
    )
