"""Single-unit performance analysis (SFP / SNP / SHP) of frozen models.

The numerical core of ``../shared/docs/methods.md`` section 2, on plain tensors:

- ``features``: tap features of a frozen model, one forward pass for all taps.
- ``readout``: the bias-free readout (with sequence pooling for token taps) trained on a tap.
- ``units``: unit performance matrices of every unit at once, from class-conditional means.
- ``reference``: a slow brute-force reference for the unit matrices (tests only).
- ``clusters``: binarisation and the authors' greedy cluster rule.
- ``summary``: per-unit and per-tap statistics (labels, noise, SNR, coverage, head structure).

Imports only torch and numpy (no ray, mlflow or optuna).
"""
