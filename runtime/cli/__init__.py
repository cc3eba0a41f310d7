"""The `vbatt` command (one module per group of subcommands)."""

from vbatt.cli.main import main

__all__ = ["main"]
