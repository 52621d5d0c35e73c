"""`python -m convert.dit|gemma|dcae ...` in a checkout: thin entry points onto the
converters in sana_jax/convert/ (installed as `sana-convert dit|gemma|dcae|bundle`)."""
