"""Sweeps: the spec (``spec``, ``stage_spec``), the Ray Tune run (``run``, ``trainable``, ``callbacks``,
``cluster``, ``storage``) and the prune stage that follows training (``prune_stage``)."""
