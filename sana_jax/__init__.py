"""sana_jax: SANA / SANA-1.5 linear diffusion transformers in JAX/Flax."""

__version__ = "0.1.0"
