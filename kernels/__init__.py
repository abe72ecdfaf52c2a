"""Pallas GPU kernels for dejavu-jax; one module per kernel (see each module's docstring)."""
