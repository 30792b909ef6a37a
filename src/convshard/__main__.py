"""``python -m convshard``: the same as the ``convshard`` command."""

from .cli import entry

if __name__ == "__main__":
    entry()
