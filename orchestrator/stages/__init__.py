"""The stages a user runs on finished trials: ``analyze`` and ``prune`` (command lines)."""
