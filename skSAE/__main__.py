"""``python -m skSAE``: the command line of `skSAE.cli`; without a subcommand, the main job."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
