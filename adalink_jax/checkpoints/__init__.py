"""Readers that map public checkpoints (HF, T5X, big_vision) onto adalink_jax parameter trees."""
