"""``python -m moe_fastmask``: the ``moe-fastmask`` command."""

import sys

from moe_fastmask.cli import main

sys.exit(main())
