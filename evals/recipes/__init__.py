"""Safety recipes for a model: ready steering configs built from training splits and measured on held-out ones."""
