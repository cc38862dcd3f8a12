"""The documentation's examples work as written.

- Every Python example (``>>>``) of the pages in docs/ is a doctest, run on the Grocery data in
  ../shared: ``GROCERY`` is its folder, ``tmp`` an empty temporary folder.
- Every ``fewshot`` command of the README's and the pages' shell examples is parsed by the
  command line itself: the command exists, its options exist and their values are valid.
- A shell example of a page is run as written by the test named in ``RUN_ELSEWHERE``, or its
  first line says that the tests do not run it, and why (``NOT_RUN``).
"""

from __future__ import annotations

import doctest
import os
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
#: written by bench/run_all.py and the benchmarks, not by hand
GENERATED = {"benchmarks.md"}
#: the first line of a shell example that the tests do not run
NOT_RUN = "# not run by the tests: "
#: shell examples run as written by another test: (page, section) -> that test
RUN_ELSEWHERE = {("docs/guides/your-data.md", "## Classify your own photos"): "tests/test_reliability.py",
                 ("docs/guides/training.md", "## Train on your own photos"): "tests/test_readme_own_photos.py"}
#: pages whose examples are many: a page that lost them fails (the others need at least one)
MIN_EXAMPLES = {"python-api.md": 30}


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md")
                  if p.name not in GENERATED and "results" not in p.relative_to(DOCS).parts)


def shell_blocks(path: Path) -> list[tuple[str, list[str]]]:
    """(the section heading above it, its lines) of every ```bash block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for m in re.finditer(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        headings = re.findall(r"^#{1,6} .*$", text[: m.start()], re.MULTILINE)
        blocks.append((headings[-1] if headings else "", m.group(1).splitlines()))
    return blocks


def fewshot_commands(lines: list[str]) -> list[list[str]]:
    """The arguments of every ``fewshot`` command in shell lines (``a && b`` is two commands)."""
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            if words[0] == "fewshot":
                commands.append(words[1:cut])
            words = words[cut + 1:]
    return commands


def parse(argv: list[str]) -> None:
    """Parse a command line as ``fewshot`` would, without running it: a usage error raises."""
    import typer

    from fewshot.cli import app

    cmd, name, ctx = typer.main.get_command(app), "fewshot", None
    while getattr(cmd, "commands", None) is not None:  # a group: the next word names its command
        ctx = cmd.make_context(name, [], parent=ctx, resilient_parsing=True)
        assert argv, f"{name}: no command given"
        sub = cmd.get_command(ctx, argv[0])
        assert sub is not None, f"{name} has no command {argv[0]!r}"
        cmd, name, argv = sub, f"{name} {argv[0]}", argv[1:]
    cmd.make_context(name, list(argv), parent=ctx)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@pytest.mark.parametrize("page", [p for p in pages() if ">>> " in p.read_text(encoding="utf-8")], ids=_rel)
def test_python_examples_run(page, grocery_root, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # pages name splits/grocery-unseen.json relative to the repository
    result = doctest.testfile(str(page), module_relative=False, globs={"GROCERY": str(grocery_root), "tmp": tmp_path},
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted >= MIN_EXAMPLES.get(page.name, 1)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {_rel(page)} failed (see above)"
    assert os.environ.get("FEWSHOT_CACHE") is None or Path(os.environ["FEWSHOT_CACHE"]).exists()


def test_every_shell_example_is_run_or_says_it_is_not():
    unmarked = []
    for page in pages():
        for heading, lines in shell_blocks(page):
            runner = RUN_ELSEWHERE.get((_rel(page), heading))
            if runner:
                source = (REPO / runner).read_text(encoding="utf-8")
                assert _rel(page).split("/")[-1] in source and heading in source, (runner, page, heading)
            elif not (lines and lines[0].startswith(NOT_RUN)):
                unmarked.append(f"{_rel(page)} ({heading}): {lines[0] if lines else ''}")
    assert not unmarked, "shell examples neither run by a test nor marked '" + NOT_RUN + "...':\n" + "\n".join(unmarked)


def test_every_fewshot_command_of_the_docs_parses():
    commands = [(_rel(path), argv) for path in [REPO / "README.md", *pages()]
                for _, lines in shell_blocks(path) for argv in fewshot_commands(lines)]
    assert len(commands) >= 40
    failed = []
    for where, argv in commands:
        try:
            parse(argv)
        except Exception as exc:  # noqa: BLE001 - a usage error of any kind, reported with its command
            failed.append(f"{where}: fewshot {shlex.join(argv)}\n    {type(exc).__name__}: {exc}")
    assert not failed, "commands of the documentation that fewshot would refuse:\n" + "\n".join(failed)


def test_the_readme_commands_are_the_ones_ci_runs():
    """.ci/run runs the README's install and test commands exactly."""
    _, setup = shell_blocks(REPO / "README.md")[0]
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    install, _, tests = setup
    assert install in ci and tests in ci
    assert "-c constraints.txt" in install and "torch==2.13.0" in (REPO / "constraints.txt").read_text()


def test_the_parse_check_can_fail():
    parse(["classify", "--index", "my-index", "photo.jpg"])
    for bad in (["classify", "--no-such-option"], ["no-such-command"], ["classify", "--top-k", "many"]):
        with pytest.raises(Exception, match="No such option|has no command|valid integer"):
            parse(bad)


def _slug(heading: str) -> str:
    """The anchor MkDocs and GitHub give a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_links_lead_somewhere():
    """The README is not part of the site (its links are not checked by ``mkdocs build``): every
    relative link names a file that exists and, with ``#anchor``, a heading of it."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", (REPO / "README.md").read_text(encoding="utf-8"))
    local = [(target, anchor) for target, anchor in links if "://" not in target]
    assert len(local) >= 10
    for target, anchor in local:
        path = REPO / target
        assert path.is_file(), f"README links to {target}, which does not exist"
        if anchor:
            headings = re.findall(r"^#{1,6} (.*)$", path.read_text(encoding="utf-8"), re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, f"README links to {target}#{anchor}: no such heading"
    assert _slug("Embedding: backbones, ONNX Runtime and the cache") == "embedding-backbones-onnx-runtime-and-the-cache"
