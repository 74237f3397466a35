"""dreamr_jax."""
