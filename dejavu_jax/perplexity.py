"""Perplexity over non-overlapping windows of a token stream.

Each window of L tokens is scored on its tokens 2..L (every token that has a prefix inside the window); a final
window shorter than L is dropped, so every scored token sees the same kind of context.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dejavu_jax.config import OPTConfig
from dejavu_jax.model import OPTForCausalLM


@functools.partial(jax.jit, static_argnames=("config",))
def window_nll(params, windows, sparsity=None, *, config: OPTConfig):
    """windows [B, L] -> summed negative log-likelihood of tokens 1..L-1 given their prefixes (fp32).

    `sparsity`: a list of `LayerSparsity` (e.g. `sparsity_from_predictors`), None for the dense model.
    """
    model = OPTForCausalLM(config, params["embed_tokens"]["embedding"].dtype)
    logits, _ = model.apply({"params": params}, windows, sparsity=sparsity)
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = windows[:, 1:]
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1).sum()


def make_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2. Got {seq_len}")
    n = len(tokens) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the data holds {len(tokens)} tokens, fewer than one window of {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def perplexity(params, config: OPTConfig, windows: np.ndarray, batch_size: int = 4, progress: bool = True,
               sparsity=None, desc: str = "perplexity") -> dict:
    if windows.shape[1] > config.max_position_embeddings:
        raise ValueError(f"seq_len {windows.shape[1]} exceeds the model's {config.max_position_embeddings} positions")
    total = 0.0
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        total += float(window_nll(params, jnp.asarray(windows[start:start + batch_size]), sparsity, config=config))
    scored = windows.shape[0] * (windows.shape[1] - 1)
    return {"ppl": math.exp(total / scored), "tokens": int(scored), "windows": int(windows.shape[0])}
