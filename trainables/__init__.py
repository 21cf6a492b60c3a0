"""Training-side code: models, data, training jobs (no orchestration imports)."""
