"""The command line's copy of the options it cannot read without torch (fewshot.cli.snapshot_data)
equals the modules it was written from: the loop's and the methods' options, the check levels,
the embedding batch size."""

from __future__ import annotations

import pytest

from fewshot.cli import snapshot
from fewshot.cli.snapshot_data import SNAPSHOT

WRITE = 'python -c "import fewshot.cli.snapshot as s; s.write()"'


@pytest.mark.parametrize("part", sorted(snapshot.PARTS))
def test_the_snapshot_equals_the_modules(part):
    live = snapshot.describe()[part]
    assert SNAPSHOT[part] == live, f"fewshot/cli/snapshot_data.py is out of date ({part}): run {WRITE}"


def test_write_writes_what_describe_reads(tmp_path):
    path = snapshot.write(tmp_path / "copy.py")
    namespace: dict = {}
    exec(path.read_text(encoding="utf-8"), namespace)  # noqa: S102 - the file just written
    assert namespace["SNAPSHOT"] == snapshot.describe()


def test_a_loaded_module_is_read_itself(monkeypatch):
    """A process that imported the module (a plugin method registered before the CLI is built)
    sees it, not the copy."""
    import fewshot.methods  # noqa: F401  (loaded: current() reads the registry)

    monkeypatch.setitem(SNAPSHOT, "methods", {"only-in-the-copy": []})
    assert "triplet" in snapshot.current("methods") and "only-in-the-copy" not in snapshot.current("methods")


def test_one_embedding_batch_size():
    """``--batch-size`` of the embedding commands and ``train --embed-batch-size`` mean the same
    and default alike (the measured 16 of fewshot.embed.DEFAULT_BATCH_SIZE)."""
    from fewshot.embed import DEFAULT_BATCH_SIZE
    from fewshot.training.config import TrainConfig

    loop = {e["name"]: e for e in SNAPSHOT["loop"]}
    assert SNAPSHOT["embed_batch_size"] == DEFAULT_BATCH_SIZE == 16
    assert TrainConfig.__dataclass_fields__["embed_batch_size"].default == DEFAULT_BATCH_SIZE
    assert f"default {DEFAULT_BATCH_SIZE}" in loop["embed_batch_size"]["help"]


def test_the_help_names_every_method_and_index_kind():
    """The choices that come from registries show in the help: ``train --method`` names every
    registered method, ``index --index-type`` every index kind."""
    from typer.testing import CliRunner

    from fewshot.cli import app
    from fewshot.index.kinds import list_kinds
    from fewshot.methods import list_methods

    method_help = {e["name"]: e for e in SNAPSHOT["loop"]}["method"]["help"]
    assert [m for m in list_methods() if m not in method_help.replace("|", " ").split()] == []
    shown = " ".join(CliRunner().invoke(app, ["index", "--help"], env={"COLUMNS": "250"}).output.split())
    assert [k for k in list_kinds() if f"{k}: " not in shown] == []
