"""``python -m mlo.compare``: see :mod:`mlo.compare.cli`."""
from .cli import main

if __name__ == "__main__":
    main()
