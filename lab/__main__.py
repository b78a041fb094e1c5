"""`python -m lab ...`: see lab/cli.py."""

from lab import lifecycle
from lab.cli import main

lifecycle.exit_now(main())  # the exit handlers run, the ~2 s interpreter teardown is skipped
