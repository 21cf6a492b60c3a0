"""Sweeps on Ray Tune with Optuna search, recorded in MLflow: the only layer that imports them."""
