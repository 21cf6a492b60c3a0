"""A small package standing for a user's own models (docs/own_model.md): nothing in it knows unitlab."""
