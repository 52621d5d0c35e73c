"""Command-line converters over sana_jax.weights."""
