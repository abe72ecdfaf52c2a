"""Third-party packages that share an import name with the project's own top-level packages.

The project's `kernels/` (the design's layout) has the import name of the PyPI package `kernels`. transformers
imports that package when it builds a model, if a version it accepts is installed (from transformers 5.25 on it is a
hard dependency, so pyproject.toml keeps transformers below 5.25); the import then finds the project's `kernels/` and
every Hugging Face path fails inside transformers with an ImportError that names our package.
"""

import pytest


def test_transformers_builds_an_opt_model_without_importing_the_pypi_kernels_package():
    import_utils = pytest.importorskip("transformers.utils.import_utils")
    is_kernels_available = getattr(import_utils, "is_kernels_available", None)
    assert is_kernels_available is None or not is_kernels_available(), (
        "transformers accepts the installed PyPI package `kernels` and will import it, but `import kernels` finds "
        "this project's kernels/: keep transformers below 5.25 (pyproject.toml) and that package out of its range"
    )
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16
    )
    model = OPTForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) > 0
