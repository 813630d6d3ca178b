"""A researcher's own package, outside the trainer: a model, a data module, a loss, a callback."""
