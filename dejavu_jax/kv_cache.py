"""The KV cache: an explicit pytree carried by the compiled decode loop.

Slots are shared by the batch (left padding aligns every sequence's newest token on the same slot), so one
scalar `cursor` says where the next token goes, and `slot_mask` says which slots hold real tokens.
"""

from __future__ import annotations

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

    @classmethod
    def create(cls, config: OPTConfig, batch: int, num_slots: int, dtype) -> "KVCache":
        shape = (batch, config.num_attention_heads, num_slots, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(
            keys=zeros,
            values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
            slot_mask=jnp.zeros((batch, num_slots), bool),
            next_position=jnp.zeros((batch,), jnp.int32),
            cursor=jnp.zeros((), jnp.int32),
        )

    @property
    def num_slots(self) -> int:
        return self.slot_mask.shape[1]

    def advance(self, chunk_mask: jax.Array) -> "KVCache":
        """Book-keeping after a chunk of tokens [batch, T] (mask 1 = real token) was written at `cursor`."""
        chunk_mask = chunk_mask.astype(bool)
        slot_mask = jax.lax.dynamic_update_slice(self.slot_mask, chunk_mask, (0, self.cursor))
        return self.replace(
            slot_mask=slot_mask,
            next_position=self.next_position + chunk_mask.sum(axis=1, dtype=jnp.int32),
            cursor=self.cursor + chunk_mask.shape[1],
        )
