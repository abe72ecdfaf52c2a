"""The JAX OPT as an lm-eval `LM`: log-likelihoods of continuations, dense or with the MLP predictors.

Requests are encoded as lm-eval's Hugging Face backend (0.4.13) encodes them: context and continuation tokenized
together with the tokenizer's own special tokens (OPT's `</s>` first, as in its training, unless the text already
starts with it), the continuation being the tokens past the context's; an empty context is the `</s>` token
alone. So task numbers are comparable with
`lm_eval --model hf`. They are scored in batches sorted by length and padded to a few bucket lengths, so a
task compiles a handful of programs rather than one per length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from tqdm import tqdm

from dejavu_jax.config import OPTConfig
from dejavu_jax.model import OPTForCausalLM
from dejavu_jax.sparsity import DENSE, SparsityPolicy


@functools.partial(jax.jit, static_argnames=("config", "policy"))
def continuation_scores(
    params, inputs, mask, targets, scored, sparse_weights=None, *, config: OPTConfig, policy: SparsityPolicy = DENSE
):
    """inputs, mask, targets, scored [B, L]: the tokens fed, their padding mask, the next token at each position
    and which positions belong to the continuation. Returns (summed log-prob [B], every token greedy [B])."""
    model = OPTForCausalLM(config, params["embed_tokens"]["embedding"].dtype)
    logits, _ = model.apply({"params": params}, inputs, mask, policy=policy, sparse_weights=sparse_weights)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_lp = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.where(scored, token_lp, 0.0).sum(-1), jnp.all(greedy | ~scored, axis=-1)


def bucket_length(n: int) -> int:
    """Pad lengths to 32, 64, 128, ... so nearby lengths share a compiled program."""
    return max(32, 1 << (n - 1).bit_length())


class JaxOPT(LM):
    """lm-eval model over a loaded OPT (`dejavu_jax.checkpoint.load_model`); `policy` and `sparse_weights` as for
    the model's forward (dejavu_jax.sparsity: e.g. each token's MLP over the neurons its predictor picks)."""

    def __init__(
        self,
        model,
        policy: SparsityPolicy = DENSE,
        sparse_weights=None,
        batch_size: int = 16,
        progress: bool = True,
        desc: str = "scoring",
    ):
        super().__init__()
        if model.tokenizer is None:
            raise ValueError(f"the model at {model.path} has no tokenizer files")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1. Got {batch_size}")
        self.model, self.policy, self.sparse_weights, self.batch_size = model, policy, sparse_weights, batch_size
        self.progress, self.desc = progress, desc
        self.max_length = model.config.max_position_embeddings

    def _encode(self, text: str, special_tokens: bool = True) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=special_tokens)["input_ids"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context move to the continuation; the continuation's tokens
        are those of (context + continuation) past the context's. An empty context is `</s>`, unless the
        continuation itself starts with it; text that already starts with `</s>` gets no second one."""
        bos = self.model.config.eos_token_id  # OPT's BOS and EOS are both </s>
        if context == "":
            cont = self._encode(continuation, special_tokens=False)
            return (cont[:1], cont[1:]) if cont and cont[0] == bos else ([bos], cont)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        special = not context.startswith(self.model.tokenizer.decode([bos]))
        whole, ctx = self._encode(context + continuation, special), self._encode(context, special)
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        for (_, cont), req in zip(pairs, requests):
            if not cont:
                raise ValueError(f"empty continuation for request {req.args!r}")
        # The fed tokens (left-truncated to the positions) and how many of them end in the continuation.
        rows = []
        for ctx, cont in pairs:
            full = (ctx + cont)[-(self.max_length + 1) :]
            rows.append((np.asarray(full, np.int32), min(len(cont), len(full) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=self.desc, unit="batch", disable=disable_tqdm or not self.progress):
            chunk = order[start : start + self.batch_size]
            length = min(bucket_length(max(len(rows[i][0]) - 1 for i in chunk)), self.max_length)
            shape = (self.batch_size, length)  # a fixed batch: the last, short batch reuses the program
            inputs, targets = np.full(shape, self.model.config.pad_token_id, np.int32), np.zeros(shape, np.int32)
            mask, scored = np.zeros(shape, np.int32), np.zeros(shape, bool)
            for row, i in enumerate(chunk):
                full, n_cont = rows[i]
                n = len(full) - 1
                inputs[row, :n], targets[row, :n], mask[row, :n] = full[:-1], full[1:], 1
                scored[row, n - n_cont : n] = True
            logprob, greedy = continuation_scores(
                self.model.params,
                jnp.asarray(inputs),
                jnp.asarray(mask),
                jnp.asarray(targets),
                jnp.asarray(scored),
                self.sparse_weights,
                config=self.model.config,
                policy=self.policy,
            )
            logprob, greedy = np.asarray(logprob), np.asarray(greedy)
            for row, i in enumerate(chunk):
                results[i] = (float(logprob[row]), bool(greedy[row]))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("rolling log-likelihood (perplexity tasks): use `python -m eval ppl`")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("generation tasks are not supported; the local tasks are log-likelihood ones")
