"""The `dts-llm` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dts-llm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="Distil a tiny student offline with DTS and print the trajectory.")
    demo.add_argument("--output", default="demo_output", help="Folder for the run (default: demo_output).")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .demo import run_demo

    run_demo(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
