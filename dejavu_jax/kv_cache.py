"""The KV cache: an explicit pytree carried by the compiled decode loop.

Slots are shared by the batch (left padding aligns every sequence's newest token on the same slot), so one
scalar `cursor` says where the next token goes, and `slot_mask` says which slots hold real tokens.

Head-sparse decoding (`dejavu_jax.sparse_attention`, "repair") also keeps per layer the attention inputs of the last
R slots (`recent_inputs`, row = slot mod R), from which a computed head recomputes the K/V it skipped.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from dejavu_jax.config import OPTConfig


@struct.dataclass
class KVCache:
    keys: tuple[jax.Array, ...]  # per layer [batch, heads, slots, head_dim]
    values: tuple[jax.Array, ...]  # per layer [batch, heads, slots, head_dim]
    slot_mask: jax.Array  # [batch, slots] bool: the slot holds a real (non-padding) token
    next_position: jax.Array  # [batch] int32: position id of the sequence's next real token
    cursor: jax.Array  # [] int32: slots written so far; the next chunk is written from here
    # per layer [batch, R, d]: the attention input (after its LayerNorm) of slot s at row s mod R; None = not kept
    recent_inputs: Optional[tuple[jax.Array, ...]] = None

    @classmethod
    def create(cls, config: OPTConfig, batch: int, num_slots: int, dtype, recent_window: int = 0) -> "KVCache":
        """An empty cache; `recent_window` R > 0 also keeps the last R attention inputs per layer
        (`SparsityPolicy.recent_window` says how many a policy needs)."""
        if not isinstance(recent_window, int) or recent_window < 0:
            raise ValueError(f"recent_window must be a non-negative int. Got {recent_window!r}")
        shape = (batch, config.num_attention_heads, num_slots, config.head_dim)
        recent = None
        if recent_window:
            recent_shape = (batch, recent_window, config.hidden_size)
            recent = tuple(jnp.zeros(recent_shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
            slot_mask=jnp.zeros((batch, num_slots), bool),
            next_position=jnp.zeros((batch,), jnp.int32),
            cursor=jnp.zeros((), jnp.int32),
            recent_inputs=recent,
        )

    @property
    def num_slots(self) -> int:
        return self.slot_mask.shape[1]

    @property
    def recent_window(self) -> int:
        """R, the slots of attention inputs kept per layer (0 = none)."""
        return 0 if self.recent_inputs is None else self.recent_inputs[0].shape[1]

    def advance(self, chunk_mask: jax.Array) -> "KVCache":
        """Book-keeping after a chunk of tokens [batch, T] (mask 1 = real token) was written at `cursor`."""
        chunk_mask = chunk_mask.astype(bool)
        slot_mask = jax.lax.dynamic_update_slice(self.slot_mask, chunk_mask, (0, self.cursor))
        return self.replace(
            slot_mask=slot_mask,
            next_position=self.next_position + chunk_mask.sum(axis=1, dtype=jnp.int32),
            cursor=self.cursor + chunk_mask.shape[1],
        )
