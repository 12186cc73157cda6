"""``python -m portable_kbit.run [options] script.py [args ...]``: the entry point of tools/run_patched.py."""

from .tools.run_patched import main

if __name__ == "__main__":
    main()
