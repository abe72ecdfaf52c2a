"""OPTConfig: one frozen, hashable description of an OPT model, static under jit.

Every shape and the layer count derive from it. The only door in from Hugging Face is
`OPTConfig.from_hf_dict` (a parsed `config.json`); the real OPT family is in `OPT_SHAPES`.
"""

from __future__ import annotations

import dataclasses
import json
import os


class ConfigError(ValueError):
    """A config that is not an OPT config, or an OPT config this library cannot run."""


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768  # d_model
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 768  # != hidden_size means project_in / project_out (opt-350m)
    do_layer_norm_before: bool = True  # False: post-LayerNorm (opt-350m)
    remove_final_layer_norm: bool = False  # HF `_remove_final_layer_norm`
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    # HF's learned positional embedding reserves two rows before position 0.
    POSITION_OFFSET = 2

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "ffn_dim",
            "max_position_embeddings",
            "word_embed_proj_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"OPTConfig.{name} must be a positive int. Got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size must be divisible by num_attention_heads. Got {self.hidden_size} and "
                f"{self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_projections(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @property
    def num_params(self) -> int:
        d, f, L = self.hidden_size, self.ffn_dim, self.num_hidden_layers
        per_layer = 4 * d * d + 2 * d * f + (4 * d + f + d if self.enable_bias else 0) + 4 * d
        embed = self.vocab_size * self.word_embed_proj_dim + (self.max_position_embeddings + 2) * d
        proj = 2 * d * self.word_embed_proj_dim if self.has_projections else 0
        final_ln = 2 * d if self.has_final_layer_norm else 0
        return L * per_layer + embed + proj + final_ln

    # ---- Hugging Face interop -------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "OPTConfig":
        model_type = hf.get("model_type")
        if model_type != "opt":
            raise ConfigError(f"expected an OPT config (model_type 'opt'). Got model_type {model_type!r}")
        activation = hf.get("activation_function", "relu")
        if activation != "relu":
            raise ConfigError(
                f"only ReLU OPT models are supported (DejaVu needs ReLU sparsity). "
                f"Got activation_function {activation!r}"
            )
        hidden = hf.get("hidden_size", 768)
        return cls(
            vocab_size=hf.get("vocab_size", 50272),
            hidden_size=hidden,
            num_hidden_layers=hf.get("num_hidden_layers", 12),
            num_attention_heads=hf.get("num_attention_heads", 12),
            ffn_dim=hf.get("ffn_dim", 3072),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
            do_layer_norm_before=hf.get("do_layer_norm_before", True),
            remove_final_layer_norm=hf.get("_remove_final_layer_norm", False),
            enable_bias=hf.get("enable_bias", True),
            layer_norm_elementwise_affine=hf.get("layer_norm_elementwise_affine", True),
            pad_token_id=hf.get("pad_token_id", 1),
            bos_token_id=hf.get("bos_token_id", 2),
            eos_token_id=hf.get("eos_token_id", 2),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "OPTConfig":
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        return {
            "model_type": "opt",
            "architectures": ["OPTForCausalLM"],
            "activation_function": "relu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "ffn_dim": self.ffn_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "word_embed_proj_dim": self.word_embed_proj_dim,
            "do_layer_norm_before": self.do_layer_norm_before,
            "_remove_final_layer_norm": self.remove_final_layer_norm,
            "enable_bias": self.enable_bias,
            "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
        }


def _shape(d: int, layers: int, heads: int, **kw) -> OPTConfig:
    return OPTConfig(
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=4 * d,
        word_embed_proj_dim=kw.pop("word_embed_proj_dim", d),
        **kw,
    )


# The released OPT family (facebook/opt-*), by name.
OPT_SHAPES: dict[str, OPTConfig] = {
    "opt-125m": _shape(768, 12, 12),
    "opt-350m": _shape(1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _shape(2048, 24, 32),
    "opt-2.7b": _shape(2560, 32, 32),
    "opt-6.7b": _shape(4096, 32, 32),
    "opt-13b": _shape(5120, 40, 40),
    "opt-30b": _shape(7168, 48, 56),
    "opt-66b": _shape(9216, 64, 72),
    "opt-175b": _shape(12288, 96, 96),
}


def shape_config(name: str) -> OPTConfig:
    if name not in OPT_SHAPES:
        raise ConfigError(f"unknown OPT shape {name!r}. Known: {', '.join(OPT_SHAPES)}")
    return OPT_SHAPES[name]


def tiny_config(**overrides) -> OPTConfig:
    """A small random-weight shape for smoke tests of benchmarks and pipelines."""
    base = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=256,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    )
    base.update(overrides)
    return OPTConfig(**base)


OPT_SHAPES["tiny"] = tiny_config()
