"""Shared fixtures. Tests run on the CPU unless a GPU test asks otherwise; torch is the fp32 reference."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Four simulated CPU devices for the tensor-parallel tests (test_parallel.py), set before JAX starts its backend.
# Everything else still runs on the first device; the suite's time does not change measurably with it.
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=4"]
)

import atexit
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

# A persistent compilation cache for this run only, shared by the xdist workers (the controller makes it, the
# workers inherit its path, the controller removes it at exit). Most of the suite's time is single-threaded XLA
# compiles, and many programs compile again unchanged: in the other worker, or in the same one where a jit is keyed
# on a new object (train/fit.py makes an optimizer per predictor, so a fit of the reference model compiles its two
# step programs 16 times). The programs and their results are the same; only the compiles are skipped.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["DEJAVU_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="dejavu-jax-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DEJAVU_TEST_JAX_CACHE"], ignore_errors=True)
if os.environ.get("DEJAVU_TEST_JAX_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ["DEJAVU_TEST_JAX_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)  # the fit step takes ~0.8 s; default 1 s
    # A size limit turns on the cache's file lock, so a worker never reads an entry the other is still writing.
    jax.config.update("jax_compilation_cache_max_size", 4 << 30)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE_MODEL = SHARED / "models" / "opt-21m-wiki"
OPT_TOKENIZER = SHARED / "tokenizers" / "opt"


@pytest.fixture(scope="session")
def reference_model_dir():
    if not REFERENCE_MODEL.exists():
        pytest.fail(f"the reference model is missing at {REFERENCE_MODEL}; ../shared must sit beside the checkout")
    return REFERENCE_MODEL


def tiny_hf_config(**overrides):
    from transformers import OPTConfig as HFConfig

    kw = dict(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=48,
        word_embed_proj_dim=None,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    kw.update(overrides)
    if kw["word_embed_proj_dim"] is None:
        kw["word_embed_proj_dim"] = kw["hidden_size"]
    return HFConfig(**kw)


def random_hf_model(hf_config, seed=0, std=0.2):
    """A random-weight HF OPT; weights larger than HF's init so that every block matters to the logits."""
    import torch
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


@pytest.fixture
def save_hf(tmp_path):
    """save_hf(model, **save_kwargs) -> directory holding the HF checkpoint."""
    counter = iter(range(1000))

    def save(model, **kwargs):
        out = tmp_path / f"hf{next(counter)}"
        model.save_pretrained(out, **kwargs)
        return out

    return save


def small_config(**overrides):
    """The tests' small OPT (d 32, 4 heads, ffn 48, 2 layers, 64 tokens): the library's `tiny_config` at test
    sizes, with `overrides` on top."""
    from dejavu_jax.config import tiny_config

    sizes = dict(vocab_size=64, hidden_size=32, ffn_dim=48, max_position_embeddings=32, word_embed_proj_dim=32)
    return tiny_config(**{**sizes, **overrides})


def fixed_heads(k: int, **tuning):
    """A policy of k scheduled heads per token (`HeadSparsity.FIXED`) with `tuning` (name=value) on top; the head
    kernels run at every batch the tests decode (by default only at batch 1: `DecodeTuning.head_max_batch`)."""
    from dejavu_jax.sparsity import HeadSparsity, SparsityPolicy
    from kernels.head_sparse import MAX_BATCH

    tuning.setdefault("head_max_batch", MAX_BATCH)
    return SparsityPolicy(heads=HeadSparsity.FIXED, head_k=k, tuning=tuple(tuning.items()))


def rel_max_err(out, ref, where=None):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if where is not None:
        out, ref = out[where], ref[where]
    return np.abs(out - ref).max() / np.abs(ref).max()


def primitives_outside_kernels(jaxpr) -> list:
    """Primitive names of a jaxpr and of the jaxprs its equations hold (loop bodies, jitted calls), not looking
    inside Pallas kernels (a pallas_call counts as one "pallas_call")."""
    import jax

    names, pending = [], [jaxpr]
    while pending:
        for eqn in pending.pop().eqns:
            names.append(eqn.primitive.name)
            if eqn.primitive.name == "pallas_call":
                continue
            for value in eqn.params.values():
                for v in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(v, jax.extend.core.ClosedJaxpr):
                        pending.append(v.jaxpr)
                    elif isinstance(v, jax.extend.core.Jaxpr):
                        pending.append(v)
    return names


def lowered_text_for_cuda(fn, *args) -> str:
    """The StableHLO text of jitted `fn` lowered for CUDA from any host (Pallas -> Triton, not Triton's own
    compile); skips the test where this jaxlib cannot lower across platforms."""
    try:
        return fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except (NotImplementedError, RuntimeError) as e:
        if "cuda" in str(e).lower() and "platform" in str(e).lower():
            pytest.skip(f"cannot lower for cuda here: {e}")
        raise


class CompiledKernelCases:
    """Base of a kernel test class: its cases run compiled on a GPU (skipped elsewhere); a subclass with
    `INTERPRET = True` re-runs every case in the Pallas interpreter on any backend."""

    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_gpu(self):
        import jax

        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas GPU kernels need a GPU; the interpret subclass covers CPU")
