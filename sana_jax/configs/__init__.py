"""ml_collections configs: one file per released model, plus `tiny` and `shapes`."""
