"""``python -m analysis.units``: the single-unit analysis of a trained model (see ``run``)."""

import sys

from analysis.units.run import main

sys.exit(main())
