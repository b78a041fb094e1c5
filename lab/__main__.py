"""`python -m lab ...`: see lab/cli.py."""

import sys

from lab import lifecycle, zygote

if sys.argv[1:2] == ["run"] and not {"-h", "--help"} & set(sys.argv):
    zygote.prestart()  # the arms' fork server imports torch, Lightning... while this process imports the rest

from lab.cli import main

lifecycle.exit_now(main())  # the exit handlers run, the ~2 s interpreter teardown is skipped
