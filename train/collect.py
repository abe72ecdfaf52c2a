"""collect: run the dense model under jit over a corpus and stream per-layer activations to disk.

Sequences: the corpus's documents are tokenized with BOS and concatenated in file order (as `corpus.token_stream`
does); the stream is cut into windows of `seq_len` tokens, which are batched. Only the stream's final window can be
short; it is right-padded and the pads are excluded (padding follows the real tokens, so under causal attention it
changes nothing they compute). Row i of the store is therefore token i of the stream, whatever the batch size.

Resume: the manifest records the rows written and the stream position of the next row (the document index and
token offset where its window starts, plus how many of that window's rows are already stored), so a rerun
re-tokenizes only from that document on and continues exactly where the last counted shard ended.

Failure: nothing is written before the first shard, so a run that fails earlier (an empty or unreadable corpus)
leaves no directory. A corpus found truncated or corrupt later ends the run with `CorpusError`; the shards before
the damage stay counted, and a rerun once the file is replaced continues after them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dejavu_jax.atomic import write_json_atomic
from dejavu_jax.config import OPTConfig
from dejavu_jax.corpus import CorpusError, corpus_kind, iter_documents
from train.activations import (
    FIELDS,
    FORMAT_VERSION,
    ActivationStoreError,
    read_manifest,
    remove_uncounted,
    shard_name,
    write_shard,
)


@dataclasses.dataclass(frozen=True)
class CollectOptions:
    model: str  # converted model dir, HF checkpoint dir or hub id
    data: str  # .txt / .jsonl / .jsonl.xz / datasets dir
    out_dir: Path  # the activations directory
    max_tokens: int = 400_000  # token budget (rows), pads excluded
    seq_len: int = 512
    batch_size: int = 8
    shard_tokens: int = 16384  # rows per shard (the last one may be shorter)
    dtype: str = "float32"  # compute dtype of the dense model

    def validate(self) -> None:
        for name in ("max_tokens", "seq_len", "batch_size", "shard_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer. Got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2. Got {self.seq_len}")


class StreamPosition(NamedTuple):
    document: int  # index of the document (in corpus order)
    offset: int  # token offset inside that document (its BOS is offset 0)


class Window(NamedTuple):
    tokens: np.ndarray  # [n <= seq_len] int32
    start: StreamPosition  # where its first token is
    end: StreamPosition  # where the token after its last one is


def iter_windows(tokenizer, path, seq_len: int, start: StreamPosition = StreamPosition(0, 0)) -> Iterator[Window]:
    """Consecutive windows of the token stream from `start` on; the last one may be short."""
    pieces: list[tuple[int, int, np.ndarray]] = []  # (document, offset of piece[0], tokens)
    buffered = 0
    next_document = start.document
    for document, text in enumerate(iter_documents(path)):
        next_document = document + 1
        if document < start.document:
            continue
        ids = np.asarray(tokenizer(text, verbose=False)["input_ids"], np.int32)
        offset = start.offset if document == start.document else 0
        if offset > len(ids):
            raise CorpusError(
                f"document {document} of {path} has {len(ids)} tokens but the manifest resumes at "
                f"token {offset}: the corpus changed since collection started"
            )
        if offset < len(ids):
            pieces.append((document, offset, ids[offset:]))
            buffered += len(ids) - offset
        while buffered >= seq_len:
            yield _cut(pieces, seq_len, next_document)
            buffered -= seq_len
    if buffered:
        yield _cut(pieces, buffered, next_document)


def _cut(pieces: list, n: int, next_document: int) -> Window:
    """Pop the first n tokens off `pieces` (mutated) as a Window."""
    start = StreamPosition(pieces[0][0], pieces[0][1])
    taken, need = [], n
    while need:
        document, offset, ids = pieces[0]
        if len(ids) <= need:
            taken.append(ids)
            need -= len(ids)
            pieces.pop(0)
        else:
            taken.append(ids[:need])
            pieces[0] = (document, offset + need, ids[need:])
            need = 0
    end = StreamPosition(pieces[0][0], pieces[0][1]) if pieces else StreamPosition(next_document, 0)
    return Window(np.concatenate(taken), start, end)


@functools.partial(jax.jit, static_argnames=("config",))
def dense_activations(params, input_ids, attention_mask, *, config: OPTConfig):
    """[B, T] -> per layer (attn_input f16 [B,T,d], mlp_input f16 [B,T,d], packed labels u8 [B,T,ffn/8],
    head norms f32 [B,T,heads]). The logits are dead code here, so XLA drops the LM head."""
    from dejavu_jax.model import OPTForCausalLM

    model = OPTForCausalLM(config, params["embed_tokens"]["embedding"].dtype)
    _, state = model.apply({"params": params}, input_ids, attention_mask, mutable=["intermediates"])
    inter = state["intermediates"]
    out = []
    for i in range(config.num_hidden_layers):
        layer = inter[f"layers_{i}"]
        out.append(
            {
                "attn_input": layer["attn_input"][0].astype(jnp.float16),
                "mlp_input": layer["mlp_input"][0].astype(jnp.float16),
                "mlp_active": jnp.packbits(layer["mlp"]["fc1_active"][0], axis=-1),
                "head_norm": layer["self_attn"]["head_norm"][0].astype(jnp.float32),
            }
        )
    return out


def load_text_model(model: str, dtype: str, seq_len: int):
    """The model (`dejavu_jax.checkpoint.load_model`), checked to have a tokenizer and `seq_len` positions."""
    from dejavu_jax.checkpoint import load_model

    loaded = load_model(model, dtype)
    if loaded.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer files; reading text needs one")
    if seq_len > loaded.config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's {loaded.config.max_position_embeddings} positions")
    return loaded


def _settings(opts: CollectOptions, config: Optional[OPTConfig]) -> dict:
    settings = {
        "model": canonical_path(opts.model),
        "data": canonical_path(opts.data),
        "seq_len": opts.seq_len,
        "shard_tokens": opts.shard_tokens,
        "compute_dtype": opts.dtype,
    }
    if config is not None:
        settings["config"] = config.to_hf_dict()
    return settings


def canonical_path(path: str) -> str:
    p = Path(path)
    return str(p.resolve()) if p.exists() else path


def _check_resumable(manifest: dict, opts: CollectOptions, out_dir: Path) -> None:
    if manifest.get("format") != FORMAT_VERSION:
        raise ActivationStoreError(
            f"{out_dir} holds activations of format {manifest.get('format')!r}; delete it or pass another --work-dir"
        )
    want = _settings(opts, None)
    have = {k: manifest.get(k) for k in want}
    if have != want:
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        raise ActivationStoreError(
            f"{out_dir} holds activations collected with other settings ({', '.join(f'{k}: {a!r} vs {b!r}' for k, (a, b) in diff.items())}); "
            f"pass --overwrite to start again, or another --work-dir"
        )


class _Segment(NamedTuple):
    window: Window
    row_lo: int  # rows [row_lo, row_hi) of the window
    row_hi: int
    tokens: np.ndarray  # [n]
    layers: list  # per layer {field: [n, ...]}


def collect(
    opts: CollectOptions,
    overwrite: bool = False,
    progress: bool = True,
    on_shard: Optional[Callable[[int, int], None]] = None,
) -> dict:
    """Collect up to `opts.max_tokens` rows into `opts.out_dir`, resuming what is there. Returns a summary.

    `on_shard(shard_index, rows_done)` runs after each shard is committed (tests interrupt through it).
    """
    opts.validate()
    corpus_kind(opts.data)  # a missing or unknown corpus fails before anything is loaded or written
    out_dir = Path(opts.out_dir)
    manifest = read_manifest(out_dir) if out_dir.exists() else None
    if manifest is not None and overwrite:
        manifest = None
    if manifest is not None:
        _check_resumable(manifest, opts, out_dir)
        if manifest["rows_done"] >= opts.max_tokens or manifest.get("exhausted"):
            return _summary(manifest, out_dir, resumed=True, new_rows=0)
    elif out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ActivationStoreError(
            f"{out_dir} exists and is not an activation directory; pass another --work-dir or --overwrite"
        )

    model = load_text_model(opts.model, opts.dtype, opts.seq_len)
    config = model.config

    resumed = manifest is not None
    if resumed:
        removed = remove_uncounted(out_dir, manifest)
        if removed and progress:
            print(f"removed uncommitted leftovers of an interrupted run: {', '.join(removed)}", file=sys.stderr)
    else:
        # Written to disk with the first shard (`start_store`): a run that fails before any row arrives (a corrupt
        # or empty corpus) leaves no directory behind, and --overwrite discards old activations only then.
        manifest = {
            "format": FORMAT_VERSION,
            **_settings(opts, config),
            "storage": {
                "attn_input": "float16",
                "mlp_input": "float16",
                "mlp_active": "uint8 np.packbits(fc1 > 0, axis=-1), big-endian bit order",
                "head_norm": "float32",
                "tokens": "int32",
            },
            "rows_done": 0,
            "position": {"document": 0, "offset": 0, "skip_rows": 0},
            "documents_consumed": 0,
            "shards": [],
            "complete": False,
            "exhausted": False,
        }
    store_exists = resumed

    def start_store() -> None:
        nonlocal store_exists
        if out_dir.is_dir():  # empty, or old activations that --overwrite discards
            shutil.rmtree(out_dir)
        elif out_dir.exists():
            out_dir.unlink()
        out_dir.mkdir(parents=True)
        write_json_atomic(out_dir / "manifest.json", manifest)
        store_exists = True

    start_rows = manifest["rows_done"]
    rows_done = start_rows  # committed
    rows_seen = start_rows  # committed + pending
    position = manifest["position"]
    skip_rows = position["skip_rows"]
    windows = iter_windows(
        model.tokenizer, opts.data, opts.seq_len, StreamPosition(position["document"], position["offset"])
    )
    B, T = opts.batch_size, opts.seq_len
    pending: list[_Segment] = []
    pending_rows = 0
    bar = tqdm(
        total=opts.max_tokens, initial=rows_done, unit="tok", desc="collect", disable=not progress, dynamic_ncols=True
    )

    def commit(n_rows: int) -> None:
        """Write the first n_rows pending rows as the next shard, then count them in the manifest."""
        nonlocal pending, pending_rows, rows_done
        taken, rest, need = [], [], n_rows
        for seg in pending:
            n = seg.row_hi - seg.row_lo
            if need >= n:
                taken.append(seg)
                need -= n
            elif need > 0:
                taken.append(_slice(seg, 0, need))
                rest.append(_slice(seg, need, n))
                need = 0
            else:
                rest.append(seg)
        last = taken[-1]
        tokens = np.concatenate([s.tokens for s in taken])
        layers = [
            {f: np.concatenate([s.layers[i][f] for s in taken]) for f in FIELDS}
            for i in range(config.num_hidden_layers)
        ]
        index = len(manifest["shards"])
        if not store_exists:
            start_store()
        write_shard(out_dir, index, tokens, layers)
        rows_done += len(tokens)
        if last.row_hi == len(last.window.tokens):
            next_pos = {"document": last.window.end.document, "offset": last.window.end.offset, "skip_rows": 0}
        else:
            next_pos = {
                "document": last.window.start.document,
                "offset": last.window.start.offset,
                "skip_rows": last.row_hi,
            }
        manifest["shards"].append({"name": shard_name(index), "rows": int(len(tokens))})
        manifest["rows_done"] = rows_done
        manifest["position"] = next_pos
        manifest["documents_consumed"] = next_pos["document"]
        write_json_atomic(out_dir / "manifest.json", manifest)
        pending, pending_rows = rest, pending_rows - len(tokens)
        if on_shard is not None:
            on_shard(index, rows_done)

    def dispatch():
        """Start the next batch on the device (JAX runs it asynchronously); None when the stream has ended."""
        batch = list(itertools.islice(windows, B))
        if not batch:
            return None
        ids = np.full((B, T), config.pad_token_id, np.int32)
        mask = np.zeros((B, T), np.int32)
        for b, window in enumerate(batch):
            ids[b, : len(window.tokens)] = window.tokens
            mask[b, : len(window.tokens)] = 1
        return batch, dense_activations(model.params, jnp.asarray(ids), jnp.asarray(mask), config=config)

    try:
        inflight = dispatch()
        while inflight is not None and rows_seen < opts.max_tokens:
            batch, out = inflight
            can_add = sum(len(w.tokens) for w in batch) - skip_rows
            # One batch ahead: the device computes it while this one is copied out and written.
            full = len(batch) == B and rows_seen + can_add < opts.max_tokens
            inflight = dispatch() if full else None
            out = jax.tree.map(np.asarray, out)
            for b, window in enumerate(batch):
                lo = skip_rows
                skip_rows = 0
                hi = min(len(window.tokens), lo + opts.max_tokens - rows_seen)
                if hi <= lo:
                    break
                layers = [{f: out[i][f][b, lo:hi] for f in FIELDS} for i in range(config.num_hidden_layers)]
                pending.append(_Segment(window, lo, hi, window.tokens[lo:hi], layers))
                pending_rows += hi - lo
                rows_seen += hi - lo
                bar.update(hi - lo)
            del out
            while pending_rows >= opts.shard_tokens:
                commit(opts.shard_tokens)
        exhausted = rows_seen < opts.max_tokens  # the loop ended before the budget: the stream has ended
        if pending_rows:
            commit(pending_rows)
        if rows_done == 0:
            raise CorpusError(f"corpus {opts.data} holds no text")
        manifest["complete"] = True
        manifest["exhausted"] = exhausted
        write_json_atomic(out_dir / "manifest.json", manifest)
    except CorpusError as e:
        if rows_done:  # the shards before the damage are complete and counted: keep them
            raise CorpusError(
                f"{e}. The {rows_done:,} tokens collected before it are kept in {out_dir}; rerun "
                f"the same command to continue once the corpus is replaced"
            ) from e
        raise
    finally:
        bar.close()
    return _summary(manifest, out_dir, resumed=resumed, new_rows=rows_done - start_rows)


def _slice(seg: _Segment, lo: int, hi: int) -> _Segment:
    """Rows [lo, hi) of a segment (relative to the segment)."""
    return _Segment(
        seg.window,
        seg.row_lo + lo,
        seg.row_lo + hi,
        seg.tokens[lo:hi],
        [{f: a[lo:hi] for f, a in layer.items()} for layer in seg.layers],
    )


def _summary(manifest: dict, out_dir: Path, resumed: bool, new_rows: int) -> dict:
    return {
        "activations": str(out_dir),
        "rows": manifest["rows_done"],
        "new_rows": new_rows,
        "shards": len(manifest["shards"]),
        "documents_consumed": manifest["documents_consumed"],
        "complete": manifest["complete"],
        "exhausted": manifest.get("exhausted", False),
        "resumed": resumed,
    }
