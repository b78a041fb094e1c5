"""Teams and history: compare existing runs, leaderboards, promotion gates (entry points `compare`, `leaderboard`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_commands(sub: argparse._SubParsersAction, add_config_options: Callable, overrides: Callable) -> None:
    """Register the history subcommands on the CLI."""
