"""Committees of finished runs: build one (``command``), register it as an MLflow Model (``register``),
label images with it (``predict``)."""
