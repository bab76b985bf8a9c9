"""`tally accounts ...` and `tally keys ...` (filled in by the admin work)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the admin subcommands to the `tally` parser's subparsers."""
    del sub


__all__ = ["argparse", "register"]
