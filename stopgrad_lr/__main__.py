"""`python -m stopgrad_lr`: the `stopgrad-lr` command."""

import sys

from stopgrad_lr.cli import main

if __name__ == "__main__":
    sys.exit(main())
