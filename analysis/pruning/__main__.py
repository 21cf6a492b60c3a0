"""``python -m analysis.pruning``: prune a trained run (see ``cli``)."""

import sys

from analysis.pruning.cli import main

sys.exit(main())
