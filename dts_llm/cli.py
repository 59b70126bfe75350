"""The `dts-llm` command line: sft, distill, cache-teacher, eval, demo, quickstart, teacher-report, sweep, study.

`sft` and `distill` run a YAML recipe, `cache-teacher` runs a distill recipe's teacher once, `demo` and
`quickstart` run offline, `teacher-report` measures a teacher's entropy across temperatures, `sweep`
distils a recipe under a grid of them, `study` compares the temperature policies over training seeds.
Each command is a module of ``dts_llm.commands``; this one only parses and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from .commands import cache_teacher, train
from .errors import exit_status
from .launch import silence_library_notices


def main(argv: list[str] | None = None) -> int:
    """Run one `dts-llm` command; a mistake the user can fix is one line on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    silence_library_notices()
    return exit_status("dts-llm", lambda: _run_command(argv))


def _other_commands() -> dict[str, ModuleType]:
    """The commands besides sft and distill, by name.

    Imported only when asked for: they import the eval package, whose metrics (nltk, scipy) add seconds to
    a start; sft and distill, started in every process of every training run, never need them.
    """
    from .commands import demo, evaluate, quickstart, study, sweep, teacher_report

    return {
        "eval": evaluate,
        "demo": demo,
        "quickstart": quickstart,
        "teacher-report": teacher_report,
        "sweep": sweep,
        "study": study,
    }


def _parsers(others: dict[str, ModuleType]) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command line's parser, and the sweep's and the study's (they leave the recipe overrides that follow
    their options)."""
    parser = argparse.ArgumentParser(prog="dts-llm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in train.COMMANDS.items():
        commands.add_parser(name, help=help_text)
    commands.add_parser("cache-teacher", help=cache_teacher.HELP)
    commands.add_parser("eval", help=others["eval"].HELP)
    for name in ("demo", "quickstart", "teacher-report"):
        others[name].add_parser(commands)
    return parser, {name: others[name].add_parser(commands) for name in ("sweep", "study")}


def _run_command(argv: list[str]) -> None:
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command in train.COMMANDS:
        train.main(command, rest)
        return
    if command == "cache-teacher":
        cache_teacher.main(rest)
        return
    others = _other_commands()
    parser, with_overrides = _parsers(others)
    if command == "eval":
        others["eval"].main(rest)
    elif command in with_overrides:
        others[command].main(*with_overrides[command].parse_known_args(rest))
    else:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
        else:
            others[args.command].main(args)


if __name__ == "__main__":
    sys.exit(main())
