"""``python -m specfed_flwr.launch``: the launcher's command line (``cli``)."""

import sys

from .cli import main

sys.exit(main())
