"""docs/cli.md is the CLI's --help as click renders it (`python -m tools.cli_docs`), and machine-independent."""

from __future__ import annotations

import os
import subprocess
import sys

import click

from tools import cli_docs


def test_committed_docs_match_click():
    expected = cli_docs.render()
    actual = cli_docs.DOC.read_text(encoding="utf-8") if cli_docs.DOC.exists() else None
    problem = cli_docs.stale(expected, actual)
    assert problem is None, problem


def test_stale_detects_a_changed_string_and_names_the_fix():
    text = cli_docs.render()
    assert cli_docs.stale(text, text) is None
    changed = text.replace("Show this message and exit.", "Show this message and leave.", 1)
    assert changed != text
    problem = cli_docs.stale(text, changed)
    assert problem is not None and "python -m tools.cli_docs" in problem and "leave" in problem
    missing = cli_docs.stale(text, None)
    assert missing is not None and "python -m tools.cli_docs" in missing


def test_render_walks_nested_groups_at_a_fixed_width():
    @click.group()
    def root():
        """Root."""

    @root.group("outer")
    def outer():
        """Outer group."""

    @outer.command("inner")
    @click.option("--knob", default=1, show_default=True, help="word " * 60)
    def inner(knob):
        """Inner command."""

    text = cli_docs.render(root, prog="tool")
    for heading in ("## tool\n", "## tool outer\n", "## tool outer inner\n"):
        assert heading in text
    assert "Usage: tool outer inner [OPTIONS]" in text
    assert text.splitlines()[0] == cli_docs.HEADER and "python -m tools.cli_docs" in cli_docs.HEADER
    assert max(len(line) for line in text.splitlines()[1:] if not line.startswith("#")) <= cli_docs.WIDTH


def test_every_command_has_a_section():
    from moegen.cli import main

    text = cli_docs.render()
    for name in main.list_commands(None):
        assert f"## moegen {name}\n" in text
    assert "## moegen trace summarize\n" in text and "## moegen trace view\n" in text


def test_help_is_the_same_in_another_environment(tmp_path):
    """Another HOME, RAY_ADDRESS, thread count and terminal width render the same text: no machine values."""
    env = {**os.environ, "HOME": str(tmp_path), "RAY_ADDRESS": "10.9.8.7:6379", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "COLUMNS": "43", "MOEGEN_CACHE": str(tmp_path / "cache"), "MOEGEN_CPU_LANES": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "cli.md"
    subprocess.run([sys.executable, "-m", "tools.cli_docs", "--output", str(out)], cwd=cli_docs.REPO, env=env,
                   check=True, capture_output=True)
    assert out.read_text(encoding="utf-8") == cli_docs.render()
