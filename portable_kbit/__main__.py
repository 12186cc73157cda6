"""`python -m portable_kbit`: the same as the `portable-kbit` console script."""

from .tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
