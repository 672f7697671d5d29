"""``python -m personafuse <workflow> ...`` (and ``accelerate launch -m personafuse ...``): the console command."""

import sys

from personafuse.cli import main

sys.exit(main())
