"""``python -m advtune`` (also what ``torchrun -m advtune`` runs)."""

import sys

from advtune.cli import main

if __name__ == "__main__":
    sys.exit(main())
