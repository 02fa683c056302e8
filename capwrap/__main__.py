"""``python -m capwrap``: the command line, where the ``capwrap`` script is not installed."""

import sys

from capwrap.cli import main

sys.exit(main())
