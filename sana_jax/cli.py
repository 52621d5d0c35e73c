"""The command-line contract's two shared pieces (DESIGN.md decision 14).

Every command raises `UsageError` for bad input found before any work, and its `main`
reports it as one `error: ...` line with exit status 2; `CommandParser` reports argparse's
own errors (unknown flag, bad type) the same way. Plain Python, no heavy imports: commands
import this before they validate anything.
"""

from __future__ import annotations

import argparse
import sys


class UsageError(ValueError):
  """Bad command-line input, found before any work: `error: <message>`, exit status 2."""


class CommandParser(argparse.ArgumentParser):
  """argparse whose errors are the contract's: the usage line, then `error: <message>` on
  stderr, exit status 2."""

  def error(self, message):
    self.print_usage(sys.stderr)
    self.exit(2, f"error: {message}\n")
