"""``python -m specfed_flwr.bench``: the same as ``specfed-flwr bench``."""

import sys

from .cli import main

sys.exit(main())
