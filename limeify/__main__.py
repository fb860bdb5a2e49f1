"""``python -m limeify``: the same command line as the ``limeify`` script."""

import sys

from .cli import main

sys.exit(main())
