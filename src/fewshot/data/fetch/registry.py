"""The datasets that can be fetched: :class:`DatasetInfo` and the ``DATASETS`` registry."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


from fewshot.errors import DataError
from fewshot.registry import Registry

from .common import ENV_DATA

@dataclass(frozen=True)
class DatasetInfo:
    """A dataset that :func:`fetch_dataset` knows how to get.

    Attributes:
        name: short name used on the command line and as the folder name (``grocery``).
        title: human title.
        url: public archive URL.
        archive_format: ``"zip"``, ``"tar"``, ``"tar.gz"``, ``"tar.bz2"`` or ``"tar.xz"``.
        licence: licence of the data.
        size_bytes: approximate download size, for display.
        citation: how to cite it.
        homepage: where it is published.
        subdir: the folder inside the archive to keep (it becomes ``ROOT/NAME``); ``""`` keeps
            the whole archive.
        tree_sha256: pinned :func:`tree_digest` of the extracted content.
        mirror_subpath: where the extracted dataset sits inside a mirror folder (default:
            ``name``).
        archive_sha256: optional pinned SHA-256 of the downloaded archive bytes.
        file_count: number of files the digest covers (for display and a cheap check).
    """

    name: str
    title: str
    url: str
    archive_format: str
    licence: str
    size_bytes: int
    citation: str
    homepage: str
    subdir: str
    tree_sha256: str
    mirror_subpath: str | None = None
    archive_sha256: str | None = None
    file_count: int | None = None

    @property
    def mirror_path(self) -> str:
        """The relative folder of this dataset inside a mirror (``mirror_subpath`` or name)."""
        return self.mirror_subpath or self.name


#: the datasets ``fewshot datasets fetch`` knows, by name
DATASETS: Registry[DatasetInfo] = Registry(
    "dataset", DataError, hint="run `fewshot datasets list` to see the datasets that can be fetched")


def register_dataset(info: DatasetInfo, *, replace: bool = False) -> DatasetInfo:
    """Add ``info`` to the registry (used by tests and plugins); returns it.

    Raises:
        ValueError: the name is taken and ``replace`` is false.
    """
    return DATASETS.add(info.name, info, replace=replace)


def unregister_dataset(name: str) -> None:
    """Remove a dataset from the registry (no error when absent)."""
    DATASETS.remove(name)


register_dataset(
    DatasetInfo(
        name="grocery",
        title="Grocery Store Dataset",
        url="https://github.com/marcusklasson/GroceryStoreDataset/archive/refs/heads/master.zip",
        archive_format="zip",
        licence="MIT",
        size_bytes=124_000_000,
        citation=(
            "M. Klasson, C. Zhang, H. Kjellström. A Hierarchical Grocery Store Image Dataset "
            "with Visual and Semantic Labels. WACV 2019."
        ),
        homepage="https://github.com/marcusklasson/GroceryStoreDataset",
        subdir="GroceryStoreDataset-master",
        tree_sha256="d7620dcae7942c1e35d7b868b63627b5616c3e00a19a85a2d48f1a11c029bea5",
        mirror_subpath="grocery-store-dataset",
        file_count=5697,
    )
)
register_dataset(
    DatasetInfo(
        name="omniglot",
        title="Omniglot (images_background_small1)",
        url="https://github.com/brendenlake/omniglot/raw/master/python/images_background_small1.zip",
        archive_format="zip",
        licence="MIT",
        size_bytes=1_300_000,
        citation=(
            "B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum. Human-level concept learning "
            "through probabilistic program induction. Science 350(6266), 2015."
        ),
        homepage="https://github.com/brendenlake/omniglot",
        subdir="images_background_small1",
        tree_sha256="db0d64d585dbbff865b7aa47f88422009d0e5a28fd6363d0993f80216e80c9e1",
        mirror_subpath="omniglot/images_background_small1",
        file_count=2720,
    )
)


def list_datasets() -> list[DatasetInfo]:
    """All registered datasets, sorted by name."""
    return [DATASETS.get(k) for k in DATASETS.names()]


def get_dataset_info(name: str | DatasetInfo) -> DatasetInfo:
    """Look up a dataset by name (a :class:`DatasetInfo` is returned as is).

    Raises:
        DataError: unknown name (the message lists the known ones).
    """
    if isinstance(name, DatasetInfo):
        return name
    return DATASETS.get(name)


def default_root() -> Path:
    """The data root: ``$FEWSHOT_DATA``, else ``$XDG_CACHE_HOME/fewshot/datasets``, else
    ``~/.cache/fewshot/datasets``."""
    env = os.environ.get(ENV_DATA)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "fewshot" / "datasets"


def dataset_path(name: str | DatasetInfo, root: str | Path | None = None) -> Path:
    """Where dataset ``name`` lives (or would live) under ``root`` (default :func:`default_root`)."""
    info = get_dataset_info(name)
    return (Path(root).expanduser() if root is not None else default_root()) / info.name
