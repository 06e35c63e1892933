"""Reward protocol, registry and built-in rewards."""
