"""``python -m graphprune``: the same command line as the ``graphprune`` script."""
import sys

from graphprune.cli import main

sys.exit(main())
