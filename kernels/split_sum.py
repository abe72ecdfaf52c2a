"""Split sums finished inside the kernel that wrote them: the last program to arrive adds the partials.

A kernel whose grid splits a sum over groups of rows (`head_out_proj`'s head groups, `nonzero_fc2`'s row segments)
writes one fp32 partial per group and column block. Summing them in XLA after the kernel costs a launch per layer
and step, plus the residual add and LayerNorm after it (one or two more). Here every program, once its partial is
stored, takes a ticket on its column block's counter (an atomic add, acquire-release at GPU scope, after a barrier
so that the whole program's stores precede it); the program that draws the last ticket of its column block adds the
block's partials in group order (deterministic: the same order whichever program arrives last), finishes the block
(bias, residual, rounding) and resets the counter to zero. Where a whole-row step follows (a LayerNorm), the column
blocks' last programs take tickets on one more counter, and the last of them finishes the row.

The counters: an int32 buffer `sync` [`sync_slots(d)`] the caller passes aliased to an output and gets back, all
zero before the call and again after it (every counter is reset by the program that drew its last ticket), so one
buffer created once per decode step serves every such launch of the step in turn. Loads of other programs' results
are volatile (never a stale L1 line). In the interpreter programs run one after another: the tickets come out the
same way, with no barrier needed.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# The narrowest column block a finishing kernel uses: `sync_slots` counts one counter per block of d plus the row's.
MIN_BLOCK_D = 16


def sync_slots(d: int) -> int:
    """Counters a `sync` buffer holds for rows of width d: one per column block of at least `MIN_BLOCK_D`, plus one."""
    return d // MIN_BLOCK_D + 1


def new_sync(d: int):
    """A zeroed `sync` buffer for rows of width d."""
    return jnp.zeros((sync_slots(d),), jnp.int32)


def check_sync(sync, d: int, block_d: int) -> None:
    if sync.shape != (sync_slots(d),) or sync.dtype != jnp.int32:
        raise ValueError(f"sync must be int32 [{sync_slots(d)}] (split_sum.new_sync(d)). Got {sync.dtype} {sync.shape}")
    if block_d < MIN_BLOCK_D:
        raise ValueError(
            f"a kernel finishing its split sum needs column blocks of at least {MIN_BLOCK_D}. Got {block_d}"
        )


def last_to_arrive(sync_ref, slot, arrivals: int, gpu: bool):
    """Takes this program's ticket on counter `slot` (after all its stores): True for the program drawing the last of
    `arrivals` tickets."""
    if gpu:
        plgpu.debug_barrier()  # every thread's stores before the ticket (a CTA barrier)
    ticket = plgpu.atomic_add(sync_ref, (jnp.asarray(slot, jnp.int32),), jnp.int32(1))
    return ticket == arrivals - 1


def reset(sync_ref, slot) -> None:
    """Leaves counter `slot` at zero for the next launch (called by its last program)."""
    sync_ref[slot] = jnp.int32(0)


def load_shared(ref_at, gpu: bool, mask=None, other=None):
    """A load of values other programs of this launch stored: volatile on GPU (never a stale L1 line); `mask` and
    `other` as `plgpu.load`'s. Volatile, not the ".cg" cache modifier: jax's Triton lowering (0.10) rejects every
    cache modifier its own check admits."""
    if gpu or mask is not None:
        return plgpu.load(ref_at, mask=mask, other=other, volatile=gpu)
    return ref_at[...]


def group_total(partials_ref, groups: int, b: int, cols, gpu: bool):
    """Σ_g partials_ref[g, b, cols] in group order (fp32)."""
    total = load_shared(partials_ref.at[0, b, cols], gpu)
    for g in range(1, groups):  # static
        total = total + load_shared(partials_ref.at[g, b, cols], gpu)
    return total


def add_residual(total, bias_ref, residual_ref, b: int, cols, dtype):
    """The block's output as the model rounds it: out = round(total + bias), then round(residual + out)."""
    out = (total + bias_ref[cols].astype(jnp.float32)).astype(dtype)
    return (residual_ref[b, cols].astype(jnp.float32) + out.astype(jnp.float32)).astype(dtype)


def finish_column_block(
    sync_ref, partials_ref, bias_ref, residual_ref, new_ref, *, cols, groups: int, gpu: bool, after=None
):
    """Every program of a column block calls this once its partial is stored: the block's last program writes
    new_ref[:, cols] = residual + (Σ_g partials + bias) (`add_residual`), resets the block's counter, then runs
    `after()` (e.g. a whole-row step that takes tickets of its own)."""
    col_block = pl.program_id(1)

    @pl.when(last_to_arrive(sync_ref, col_block, groups, gpu))
    def _():
        for b in range(new_ref.shape[0]):
            total = group_total(partials_ref, groups, b, cols, gpu)
            new_ref[b, cols] = add_residual(total, bias_ref, residual_ref, b, cols, new_ref.dtype)
        reset(sync_ref, col_block)
        if after is not None:
            after()
