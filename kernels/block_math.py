"""Integer helpers for choosing power-of-two block sizes (Triton loads and stores need them)."""


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
