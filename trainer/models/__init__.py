"""Models; each takes ``in_shape`` and ``num_classes`` from the data plus its config keys."""
