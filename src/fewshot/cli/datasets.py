"""``fewshot datasets``: list the known public datasets and fetch them.

The main CLI mounts this sub-app with ``app.add_typer(datasets.app, name="datasets")``::

    fewshot datasets list
    fewshot datasets fetch grocery                       # from the public source
    fewshot datasets fetch grocery --mirror ../shared/data   # offline, from a local copy

The dataset registry (:mod:`fewshot.data.fetch`) is imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .common import DATA, OUTPUT, NoProgressOpt, examples, handle_errors, one_line

app = typer.Typer(
    help="List and fetch the public datasets (Grocery Store Dataset, Omniglot).",
    no_args_is_help=True,
    epilog=examples("fewshot datasets list", "fewshot datasets fetch grocery --mirror ../shared/data"),
)


@app.command("list", epilog=examples("fewshot datasets list", "fewshot datasets list --root runs/datasets"))
@handle_errors
def list_cmd(
    root: Optional[Path] = typer.Option(
        None, "--root", rich_help_panel=DATA, help="Data root to look in (default: $FEWSHOT_DATA or the user cache)."
    ),
) -> None:
    """Show the datasets that `fewshot datasets fetch` knows: source, licence, size, citation."""
    from rich import filesize
    from rich.console import Console
    from rich.table import Table

    from ..data import fetch as _fetch

    table = Table(title="fewshot datasets", show_lines=True)
    for col in ("name", "source", "licence", "size", "citation", "status"):
        table.add_column(col, overflow="fold")
    for info in _fetch.list_datasets():
        dest = _fetch.dataset_path(info, root)
        status = f"fetched: {dest}" if _fetch.is_verified(dest, info) else "not fetched"
        cells = (info.name, f"{info.title}\n{info.homepage}", info.licence, "~" + filesize.decimal(info.size_bytes),
                 info.citation, status)
        table.add_row(*(escape(c) for c in cells))  # a path or citation may hold [brackets]
    Console().print(table)


@app.command("fetch", epilog=examples("fewshot datasets fetch grocery",
                                      "fewshot datasets fetch omniglot --mirror ../shared/data",
                                      "fewshot datasets fetch grocery --verify --no-progress"))
@handle_errors(flags={"force": "--overwrite", "force=True": "--overwrite"})  # the library's force is --overwrite
def fetch_cmd(
    name: str = typer.Argument(..., help="Dataset name (see `fewshot datasets list`)."),
    root: Optional[Path] = typer.Option(
        None, "--root", rich_help_panel=DATA, help="Data root; the dataset goes to ROOT/NAME "
        "(default: $FEWSHOT_DATA or ~/.cache/fewshot/datasets)."
    ),
    mirror: Optional[Path] = typer.Option(
        None, "--mirror", rich_help_panel=DATA, help="Local folder or archive to take the dataset from instead of "
        "the network (default: $FEWSHOT_DATASETS_MIRROR), e.g. ../shared/data."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel=OUTPUT, help="Fetch again and replace a copy "
                                   "fewshot fetched (never another folder, never files you added to it)."),
    verify: bool = typer.Option(
        False, "--verify", rich_help_panel=DATA, help="Re-check an existing copy with the full content checksum."
    ),
    no_progress: bool = NoProgressOpt,
    force: bool = typer.Option(False, "--force", hidden=True, help="The old name of --overwrite."),
    progress: bool = typer.Option(False, "--progress", hidden=True, help="Show progress bars (the default)."),
) -> None:
    """Download (or copy from --mirror) a dataset, verify its checksum, print its folder. A copy
    fewshot fetched and verified is not fetched again (unless --overwrite)."""
    from ..data import fetch as _fetch

    path = _fetch.fetch_dataset(name, root=root, mirror=mirror, progress=not no_progress, force=overwrite or force,
                                verify=verify)
    typer.echo(one_line(path))
