"""``python -m adaclip``: the command line of :mod:`adaclip.research.cli`."""

import sys

from adaclip.research.cli import main

sys.exit(main())
