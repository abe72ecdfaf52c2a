"""`python -m eval`: quality of a model, dense vs sparse (perplexity; zero-shot downstream tasks)."""
