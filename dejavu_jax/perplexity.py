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
from dejavu_jax.sparsity import DENSE, HeadSparsity, MLPSparsity, SparsityPolicy


def layer_densities(intermediates, num_layers: int, block: str = "mlp", name: str = "mlp_density"):
    """Per layer, the summed per-token density `name` that `block` sowed ([L] fp32; zeros where none was sown)."""
    out = []
    for i in range(num_layers):
        sown = intermediates.get(f"layers_{i}", {}).get(block, {}).get(name)
        out.append(jnp.float32(0) if sown is None else sown[0].astype(jnp.float32).sum())
    return jnp.stack(out)


@functools.partial(jax.jit, static_argnames=("config", "policy"))
def window_nll(params, windows, sparse_weights=None, *, config: OPTConfig, policy: SparsityPolicy = DENSE):
    """windows [B, L] -> (summed negative log-likelihood of tokens 1..L-1 given their prefixes (fp32), per layer
    the summed fraction of MLP rows computed per token [L], per layer the summed fraction of heads kept per token
    [L]) under `policy` (dejavu_jax.sparsity)."""
    model = OPTForCausalLM(config, params["embed_tokens"]["embedding"].dtype)
    (logits, _), state = model.apply(
        {"params": params}, windows, policy=policy, sparse_weights=sparse_weights, mutable=["intermediates"]
    )
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = windows[:, 1:]
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1).sum()
    sown, layers = state["intermediates"], config.num_hidden_layers
    return nll, layer_densities(sown, layers), layer_densities(sown, layers, "self_attn", "head_density")


def make_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2. Got {seq_len}")
    n = len(tokens) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the data holds {len(tokens)} tokens, fewer than one window of {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def perplexity(
    params,
    config: OPTConfig,
    windows: np.ndarray,
    batch_size: int = 4,
    progress: bool = True,
    policy: SparsityPolicy = DENSE,
    sparse_weights=None,
    desc: str = "perplexity",
) -> dict:
    """Perplexity of `windows`; with MLP sparsity also "mlp_density": per layer the mean fraction of MLP rows
    computed per token (for lossless, of fc2 rows read) over every token of the windows; with head sparsity also
    "head_density": per layer the mean fraction of heads kept per token."""
    if windows.shape[1] > config.max_position_embeddings:
        raise ValueError(f"seq_len {windows.shape[1]} exceeds the model's {config.max_position_embeddings} positions")
    total, density, head_density = 0.0, np.zeros(config.num_hidden_layers), np.zeros(config.num_hidden_layers)
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        nll, dens, head_dens = window_nll(
            params, jnp.asarray(windows[start : start + batch_size]), sparse_weights, config=config, policy=policy
        )
        total += float(nll)
        density += np.asarray(dens, np.float64)
        head_density += np.asarray(head_dens, np.float64)
    scored = windows.shape[0] * (windows.shape[1] - 1)
    result = {"ppl": math.exp(total / scored), "tokens": int(scored), "windows": int(windows.shape[0])}
    if policy.mlp != MLPSparsity.NONE:
        result["mlp_density"] = [float(v) for v in density / windows.size]
    if policy.heads != HeadSparsity.NONE:
        result["head_density"] = [float(v) for v in head_density / windows.size]
    return result
