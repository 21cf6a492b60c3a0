"""Cluster-guided pruning (docs/methods.md section 5): ``masks`` builds and enforces masks from label
sets on the connections a model declares; ``job`` prunes a trained run and fine-tunes it
(``PruneConfig``, ``PrunePlan``); ``cli`` is ``python -m analysis.pruning``.
"""
