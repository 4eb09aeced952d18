"""Command-line interface (placeholder until the end-to-end CLI lands)."""

from __future__ import annotations

import argparse

from advtune._version import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="advtune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"advtune {__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0
