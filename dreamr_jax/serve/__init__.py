"""Serving: loading shipped or user checkpoints, and the batch inference loop behind serve.py."""
