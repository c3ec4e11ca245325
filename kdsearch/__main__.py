"""``python -m kdsearch``: the command line."""

import sys

from kdsearch.cli import main

sys.exit(main())
