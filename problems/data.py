"""Alias of :mod:`problems.datasets` (loaders, splits and loader helpers)."""
from .datasets import *  # noqa: F401,F403
from .datasets import __all__  # noqa: F401
