"""Deprecated: moved to :mod:`mlo.fastpath` (a re-export until ``mlo.update`` imports it from there)."""
from .fastpath import sgd_step  # noqa: F401
