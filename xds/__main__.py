"""`python -m xds`: the same as the `xds` command."""

import sys

from xds.cli import main

sys.exit(main())
