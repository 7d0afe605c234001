"""`python -m organtrain` is the `organtrain` command."""

import sys

from organtrain.cli import main

sys.exit(main())
