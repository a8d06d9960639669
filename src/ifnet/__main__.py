"""``python -m ifnet ...`` (also what ``torchrun -m ifnet train ...`` runs)."""

import sys

from ifnet.cli import main

if __name__ == "__main__":
    sys.exit(main())
