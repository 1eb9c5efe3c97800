"""`python -m fer_tune.cli`: the fer-tune command."""

import sys

from . import main

sys.exit(main())
