"""What a trained network learned, and what follows from it (``docs/methods.md``).

- ``units``: the single-unit analysis (SFP / SNP / SHP): tap features, readouts, unit matrices,
  clusters, noise, SNR and head structure; ``python -m analysis.units``.
- ``pruning``: cluster-guided masks (AFCC, ANDC, nodal) and their controls, and the prune job that
  applies them and fine-tunes; ``python -m analysis.pruning``.
- ``committees``: soft committees selected on validation from stored probabilities.

Imports only torch, numpy and pyarrow (no ray, mlflow or optuna), so it runs on a bare GPU box.
"""
