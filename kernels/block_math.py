"""Integer helpers for choosing power-of-two block sizes (Triton loads and stores need them), and sums over column
blocks inside a kernel."""

import functools
import operator

import jax.numpy as jnp


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap."""
    return min(n & -n, prev_pow2(cap))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_pieces(n: int) -> tuple[tuple[int, int], ...]:
    """(start, size) power-of-two pieces covering [0, n), largest first: 80 -> (0, 64), (64, 16)."""
    pieces, start = [], 0
    for bit in reversed(range(int(n).bit_length())):
        size = 1 << bit
        if n & size:
            pieces.append((start, size))
            start += size
    return tuple(pieces)


# A reduction inside a Triton program is a barrier and a shared-memory round trip. A sum over d that arrives as
# several column blocks (d = 5120 is five blocks of 1024) is cheaper added up elementwise first and reduced once
# (`once=True`); `once=False` reduces every block and adds the results (the same fp32 sum in another order).


def block_total(blocks, once: bool = True):
    """The fp32 sum of every element of the equally shaped `blocks`."""
    if once:
        return jnp.sum(functools.reduce(operator.add, blocks))
    return sum(jnp.sum(v) for v in blocks)


def block_row_dots(w_blocks, x_blocks, once: bool = True):
    """[rows]: sum over every block j of w_blocks[j] [rows, n] · x_blocks[j] [n]."""
    products = [w * x[None, :] for w, x in zip(w_blocks, x_blocks)]
    if once:
        return jnp.sum(functools.reduce(operator.add, products), axis=1)
    return sum(jnp.sum(v, axis=1) for v in products)
