"""Help that teaches (issue 32): every help of the command tree ends with real examples that parse
as commands of this app, no rich markup eats a bracket, and the same thing is spelt and
defaults alike on every command."""

from __future__ import annotations

import re
import shlex
from collections import defaultdict

import pytest
import typer
from rich.text import Text
from typer.testing import CliRunner

from fewshot.cli import app

ROOT = typer.main.get_command(app)
#: click's base of the errors a bad command line raises (typer may bring its own click)
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _tree(cmd=ROOT, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """``(path, command)`` of the top level, every group and every command."""
    out = [(path, cmd)]
    for name, sub in getattr(cmd, "commands", {}).items():
        out += _tree(sub, (*path, name))
    return out


TREE = _tree()
LEAVES = [(p, c) for p, c in TREE if not hasattr(c, "commands")]


def _examples(cmd) -> list[list[str]]:
    """The argv of each example in the command's epilog, as a shell reads the text shown."""
    shown = Text.from_markup(cmd.epilog or "").plain
    lines = shown.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith("fewshot ")]


def _parse(argv: list[str]):
    """The context of ``argv`` (``fewshot ...``) as click parses it, group by group, with every
    check on (an unknown option, a missing required one or a bad value raises)."""
    assert argv[0] == "fewshot", argv
    cmd, name, args, parent = ROOT, "fewshot", argv[1:], None
    while True:
        ctx = cmd.make_context(name, list(args), parent=parent, resilient_parsing=False)
        if not hasattr(cmd, "commands"):
            return ctx
        protected = getattr(ctx, "_protected_args", None)
        rest = [*(protected if protected is not None else ctx.protected_args), *ctx.args]
        name, cmd, args = cmd.resolve_command(ctx, rest)
        parent = ctx


@pytest.mark.parametrize("path,cmd", TREE, ids=[" ".join(p) or "fewshot" for p, _ in TREE])
def test_every_help_ends_with_examples_that_parse(path, cmd):
    examples = _examples(cmd)
    assert 2 <= len(examples) <= 3 or (path == ("backbones",) and len(examples) == 1), (path, examples)
    for argv in examples:
        ctx = _parse(argv)
        assert ctx.command is not None
    if path:  # a command's examples run that command (a group's: one of its commands)
        assert any(tuple(argv[1:1 + len(path)]) == path for argv in examples), (path, examples)
    r = CliRunner().invoke(app, [*path, "--help"])
    assert r.exit_code == 0 and "Examples" in r.output.split("─╯")[-1]  # the last thing shown


def test_the_example_check_catches_bad_examples():
    for bad in ("fewshot classify --index runs/x --no-such-option", "fewshot index --data grocery",
                "fewshot no-such-command", "fewshot classify --top-k zero --index x"):
        with pytest.raises(UsageError):  # NoSuchOption, MissingParameter, BadParameter
            _parse(shlex.split(bad))


def _help_texts():
    """``(where, text)`` of every help text of the tree as written: commands' help and epilogs,
    every option's and argument's help."""
    for path, cmd in TREE:
        where = " ".join(("fewshot", *path))
        yield where, cmd.help or ""
        yield f"{where} (examples)", cmd.epilog or ""
        for p in cmd.params:
            yield f"{where} {p.opts[0]}", getattr(p, "help", None) or ""


#: markup that help texts may use on purpose
STYLE = {"[b]", "[/b]"}


def test_no_bracket_is_lost_to_rich_markup():
    """Help texts are rich markup: a bracket meant as text (``".[scale]"``) must be written
    escaped, or rich takes it for a style and drops it."""
    lost = []
    for where, text in _help_texts():
        meant = re.sub(r"\\(\[)", r"\1", text)  # what the writer meant: an escaped bracket is a bracket
        shown = Text.from_markup(text).plain
        lost += [f"{where}: {b}" for b in re.findall(r"\[[^\[\]\n]*\]", meant) if b not in STYLE and b not in shown]
    assert lost == []


def test_the_bracket_check_catches_an_unescaped_extra():
    text = 'Ray Data; pip install -e ".[scale]"'
    assert "[scale]" not in Text.from_markup(text).plain  # what rich did to `embed --distributed`


def test_embed_distributed_shows_its_extra():
    r = CliRunner().invoke(app, ["embed", "--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and 'pip install -e ".[scale]"' in r.output


def _options(cmd, hidden: bool = False) -> dict[str, object]:
    return {o: p for p in cmd.params if p.param_type_name == "option" and (hidden or not p.hidden)
            for o in [*p.opts, *p.secondary_opts]}


def test_progress_and_overwrite_are_spelt_alike():
    """``--no-progress`` on every command that shows progress and accepted by every batch command
    that reads data or an index (the service aside); ``--overwrite`` for replacing earlier output; the old spellings of
    ``datasets fetch`` (``--progress``, ``--force``) still work but are not shown."""
    for path, cmd in LEAVES:
        shown = _options(cmd)
        assert not [o for o in shown if "progress" in o and o != "--no-progress"], path
        assert "--force" not in shown, path
        reads = ({"--data", "--index"} & set(shown) or path == ("datasets", "fetch")) and path != ("serve",)
        if reads:
            assert "--no-progress" in _options(cmd, hidden=True), path
        if "--batch-size" in shown and shown["--batch-size"].rich_help_panel == "Performance":
            assert "--no-progress" in shown, path  # it embeds: it shows progress
    assert "--no-progress" in _options(dict(TREE)[("datasets", "fetch")])
    for old in ("fewshot datasets fetch grocery --force --progress", "fewshot split --data x --out y --no-progress"):
        _parse(shlex.split(old))


def test_one_default_per_meaning():
    """A flag in the same help panel of two commands means the same and defaults alike (a
    default left to other settings, shown as none, aside); the embedding batch size defaults
    alike in ``--batch-size`` and ``train --embed-batch-size``."""
    defaults = defaultdict(dict)
    for path, cmd in LEAVES:
        for flag, p in _options(cmd).items():
            if p.default is not None:
                defaults[(flag, p.rich_help_panel)][" ".join(path)] = p.default
    differ = {k: v for k, v in defaults.items() if len({repr(d) for d in v.values()}) > 1}
    assert differ == {}
    batch = defaults[("--batch-size", "Performance")]
    assert set(batch) >= {"embed", "evaluate", "index", "classify"} and set(batch.values()) == {16}
    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert "Images per forward pass when embedding (default 16," in r.output
