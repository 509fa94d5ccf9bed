"""``python -m qednbd``: the same as the ``qednbd`` command."""

from qednbd.cli import main

if __name__ == "__main__":
    main()
