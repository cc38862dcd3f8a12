"""MkDocs hook: the command-line reference (docs/reference/cli.md) is the Markdown that typer's
own generator writes for the ``fewshot`` app (``typer fewshot.cli utils docs``), made at build
time, so the page always matches the commands, their options and their help. A failure of the
generator fails the build."""

from __future__ import annotations

import subprocess
import sys

from mkdocs.exceptions import PluginError

#: the line of docs/reference/cli.md that the generated reference replaces
MARKER = "<!-- typer fewshot.cli utils docs -->"


def _demoted(markdown: str) -> str:
    """The generated headings one level down (the page has its own title); fenced code untouched."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        fenced ^= line.startswith("```")
        lines.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    cmd = [sys.executable, "-m", "typer", "fewshot.cli", "utils", "docs", "--name", "fewshot"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 or "## `fewshot " not in res.stdout:
        raise PluginError(f"{' '.join(cmd[1:])} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return markdown.replace(MARKER, _demoted(res.stdout))
