"""`python -m bench`: kernel and end-to-end generation benchmarks (scripts, not tests)."""
