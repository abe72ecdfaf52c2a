"""Integer helpers for choosing power-of-two block sizes (Triton loads and stores need them)."""


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prev_pow2(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
