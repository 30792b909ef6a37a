"""``python -m convshard``: the same as the ``convshard`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
