"""``python -m exercises check [name ...] [--solutions]``: see exercises/README.md."""
from .check import main

if __name__ == "__main__":
    raise SystemExit(main())
