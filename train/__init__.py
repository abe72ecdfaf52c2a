"""`python -m train`: collect dense activations, fit the DejaVu predictors, calibrate K per layer."""
