"""`python -m finegates.cli ...`: the `finegates` command."""

import sys

from . import main

sys.exit(main())
