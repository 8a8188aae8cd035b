"""`python -m moegen ...` runs the CLI (what `moegen bench` uses to time a run from process start)."""

from moegen.cli import run

run()
