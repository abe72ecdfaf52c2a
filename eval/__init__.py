"""`python -m eval`: quality of a model, dense vs sparse (perplexity; downstream tasks to come)."""
