"""`python -m sfmkern.cli`: the `sfmkern` command line."""

import sys

from sfmkern.cli import main

sys.exit(main())
