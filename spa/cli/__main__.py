"""python -m spa.cli: the spa-prune command."""
import sys

from . import main

sys.exit(main())
