"""docs/cli.md: every `moegen` command's --help, rendered from click at a fixed width.

    python -m tools.cli_docs           # (re)write docs/cli.md
    python -m tools.cli_docs --check   # exit 1, naming the fix, when docs/cli.md is stale

The help is rendered from the click group `moegen.cli.main`, walked recursively (nested groups such as
`trace` included), at a fixed width of 100 columns whatever the terminal, so the file is the same on every
machine. Option help must therefore state rules, not values computed on this machine (core counts, memory,
paths under the home directory, environment variables' values).
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "cli.md"
REGENERATE = "python -m tools.cli_docs"
WIDTH = 100
HEADER = (f"<!-- Generated from the click commands by `{REGENERATE}`; do not edit by hand: change the help in "
          f"moegen/cli*.py and run `{REGENERATE}` again. -->")


def _walk(command: click.Command, ctx: click.Context):
    """(ctx, command) for command and every subcommand below it, depth first in click's listing order."""
    yield ctx, command
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or getattr(sub, "hidden", False):
                continue
            yield from _walk(sub, _context(sub, name, ctx))


def _context(command: click.Command, name: str, parent: click.Context | None) -> click.Context:
    """The context `moegen ... NAME --help` prints with (the command's own context_settings, e.g. -h), at WIDTH."""
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    return click.Context(command, info_name=name, parent=parent, **settings)


def render(group: click.Command | None = None, prog: str = "moegen") -> str:
    """The text of docs/cli.md, built from click (by default from `moegen.cli.main`)."""
    if group is None:
        from moegen.cli import main as group
    root = _context(group, prog, None)
    parts = [HEADER, "", "# The `moegen` command line", "",
             "Every command's `--help`, as click prints it at a width of 100 columns.", ""]
    for ctx, command in _walk(group, root):
        parts += [f"## {ctx.command_path}", "", "```text", command.get_help(ctx).rstrip(), "```", ""]
    return "\n".join(parts)


def _shown(path: Path) -> Path:
    try:
        return path.resolve().relative_to(REPO)
    except ValueError:
        return path


def stale(expected: str, actual: str | None, path: Path = DOC) -> str | None:
    """None when the file's text `actual` (None: no file) is `expected`; else a message naming the fix."""
    if actual == expected:
        return None
    shown = _shown(path)
    if actual is None:
        return f"{shown} is missing; run `{REGENERATE}` to write it"
    diff = "".join(list(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True), f"{shown} (committed)",
                                             f"{shown} (from click)", n=1))[:40])
    return f"{shown} is stale (the CLI's help changed); run `{REGENERATE}` to regenerate it\n{diff}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 when docs/cli.md differs from the CLI's help.")
    parser.add_argument("--output", type=Path, default=DOC, help="Where to write (default: docs/cli.md).")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        actual = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        problem = stale(text, actual, args.output)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print(f"{_shown(args.output)} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {_shown(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
