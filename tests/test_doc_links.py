"""Every relative link and image in README.md and docs/*.md names a file in this repository, and none points
outside it (a target resolving above the repository root, or the text `../shared`)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]

# [text](target) and ![alt](target); the target may be <...> and may carry a "title".
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"  # [text] or ![alt], one level of nested brackets
                    r"\(\s*(<[^>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)"  # (target, balanced parentheses inside
                    r"(?:\s+[\"'(][^\n]*?)?\s*\)")  # an optional "title")
REFERENCE = re.compile(r"^ {0,3}\[[^\]\n]+\]:\s*(<[^>\n]*>|\S+)", re.MULTILINE)  # [label]: target
HTML = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href|srcset)\s*=\s*(\"[^\"]*\"|'[^']*'|[^\s>]+)", re.IGNORECASE)
FENCE = re.compile(r"^ {0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
OUTSIDE_TEXT = ("../shared",)


def doc_files(root: Path = REPO) -> list[Path]:
    """README.md and docs/*.md."""
    files = [root / "README.md"] if (root / "README.md").exists() else []
    return files + sorted((root / "docs").glob("*.md"))


def _prose(text: str) -> str:
    """text with fenced code blocks and inline code blanked (same offsets, newlines kept): no links live there."""
    out, fence = [], None
    for line in text.splitlines(keepends=True):
        opened = FENCE.match(line)
        if fence is None and opened:
            fence = opened.group(1)
            out.append(re.sub(r"[^\n]", " ", line))
        elif fence is not None:
            if line.lstrip().startswith(fence):
                fence = None
            out.append(re.sub(r"[^\n]", " ", line))
        else:
            out.append(INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line))
    return "".join(out)


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link, image, reference definition and HTML src/href in text."""
    prose = _prose(text)
    found = []
    for pattern in (INLINE, REFERENCE, HTML):
        for m in pattern.finditer(prose):
            target = m.group(1).strip()
            if target[:1] in "\"'" and target[-1:] == target[:1]:
                target = target[1:-1]
            if target.startswith("<") and target.endswith(">"):
                target = target[1:-1]
            if pattern is HTML and "srcset" in m.group(0).lower():
                target = target.split(",")[0].split()[0] if target.strip() else target
            found.append((prose.count("\n", 0, m.start(1)) + 1, target.strip()))
    return sorted(found)


def _inside(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root) + os.sep)


def _ignored(paths: list[Path], root: Path) -> set[Path]:
    """The paths git ignores (never committed, so a link to one breaks for everyone else); none without git."""
    if not paths:
        return set()
    try:
        done = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=root, capture_output=True,
                              text=True, input="\n".join(str(p.relative_to(root)) for p in paths), timeout=30)
    except (OSError, subprocess.SubprocessError):
        return set()
    return {root / line for line in done.stdout.splitlines() if line}


def problems(files: list[Path], root: Path = REPO) -> list[str]:
    """`file:line: target (why)` for every broken or outside link in files, and every line naming ../shared."""
    root = root.resolve()
    out, exists = [], []
    for file in files:
        text = file.read_text(encoding="utf-8")
        shown = file.relative_to(root) if _inside(str(file), root) else file
        for number, line in enumerate(text.splitlines(), 1):
            for needle in OUTSIDE_TEXT:
                if needle in line:
                    out.append(f"{shown}:{number}: {needle} (points outside the repository)")
        for number, target in links(text):
            if not target or target.startswith("#"):
                continue
            if SCHEME.match(target) and not target.lower().startswith("file:"):
                continue  # http(s), mailto and other URLs: not files of this repository
            if target.lower().startswith("file:"):
                out.append(f"{shown}:{number}: {target} (a file: URL points outside the repository)")
                continue
            path = unquote(target.split("#", 1)[0].split("?", 1)[0])
            base = root if path.startswith("/") else file.parent
            resolved = os.path.normpath(os.path.join(base, path.lstrip("/")))
            if not _inside(resolved, root) or not _inside(os.path.realpath(resolved), root):
                out.append(f"{shown}:{number}: {target} (resolves outside the repository)")
            elif not os.path.exists(resolved):
                out.append(f"{shown}:{number}: {target} (no such file)")
            else:
                exists.append((Path(resolved), f"{shown}:{number}: {target} (git ignores it: never committed)"))
    ignored = _ignored([p for p, _ in exists], root)
    out += [message for p, message in exists if p in ignored]
    return out


def test_docs_links_resolve_inside_the_repository():
    files = doc_files()
    assert files, "no README.md or docs/*.md found"
    found = problems(files)
    assert not found, "broken or outside links:\n" + "\n".join(found)


def test_checker_catches_broken_and_outside_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")
    (tmp_path / "data.json").write_text("{}")
    (tmp_path / "README.md").write_text(
        "# t\n"
        "[ok](docs/guide.md#part) ![ok](img/a.png) [web](https://example.com/x) [mail](mailto:a@b.c) [anchor](#t)\n"
        "[missing](docs/nope.md)\n"
        "```\n[in a code block](not/checked.md)\n```\n"
        "`[inline code](not/checked.md)` and [up](../elsewhere.md)\n", encoding="utf-8")
    (tmp_path / "docs" / "guide.md").write_text(
        '[data](../data.json "title") <img src="../img/b.png" alt="x">\n'
        "![gone](./missing.png)\n"
        "see ../shared/notes for more\n"
        "[ref]: ../img/a.png\n"
        "[badref]: nowhere.txt\n", encoding="utf-8")
    found = problems(doc_files(tmp_path), tmp_path)
    assert sorted(found) == sorted([
        "README.md:3: docs/nope.md (no such file)",
        "README.md:7: ../elsewhere.md (resolves outside the repository)",
        "docs/guide.md:1: ../img/b.png (no such file)",
        "docs/guide.md:2: ./missing.png (no such file)",
        "docs/guide.md:3: ../shared (points outside the repository)",
        "docs/guide.md:5: nowhere.txt (no such file)",
    ])


def test_links_parses_titles_angle_brackets_and_parentheses():
    text = '[a](x.md "t") [b](<with space.md>) [c](f(1).md) ![d](i.png)\n<img width=3 src=\'j.png\'>\n'
    assert links(text) == [(1, "f(1).md"), (1, "i.png"), (1, "with space.md"), (1, "x.md"), (2, "j.png")]
