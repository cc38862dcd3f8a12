"""``fewshot embed`` as a function: embed a dataset and write its embeddings file.

Here rather than in :mod:`fewshot.embed.export` (which owns the file format) because it loads
the model the options name, a training run included (:mod:`fewshot.methods`), a layer above
:mod:`fewshot.embed`.
"""

from __future__ import annotations

from pathlib import Path

from ..data.protocol import ALL_SPLITS, data_protection, load_data
from ..embed.export import check_embeddings_name, is_embeddings_file, save_embeddings
from ..embed.options import EmbedOptions
from ..io import check_output
from ..methods.from_options import model_from_options
from ..version import environment

__all__ = ["export_embeddings"]


def export_embeddings(data: str, out: str | Path, *, split: str | None = None, group_from: str | None = None,
                      embed: EmbedOptions | None = None, overwrite: bool = False,
                      layout: str = "auto") -> tuple[int, int]:
    """Embed a dataset and write vectors, labels, groups and paths (``.safetensors`` or ``.npz``).

    The safetensors file holds ``embeddings`` (``float32 [N, E]``) and its metadata holds the
    JSON lists ``labels``, ``groups``, ``paths`` and ``config``. Returns ``(N, E)``.

    Args:
        split: an image split, ``"all"`` or ``None`` (all images).
        layout: how a folder tree is read (``--layout``, :func:`fewshot.data.load_dataset`).
        overwrite: replace ``out`` when it is an embeddings file this function wrote; any
            other existing file is refused.

    Raises:
        DataError: bad data or split, an output name that is neither ``.safetensors`` nor
            ``.npz``, or an ``out`` that may not be written (checked before embedding).
    """
    out = Path(out)
    check_embeddings_name(out)
    embed = embed or EmbedOptions()
    dataset = load_data(data, split, group_from, embed.strict, layout=layout)
    check_output(out, what="fewshot embeddings file", is_ours=is_embeddings_file, overwrite=overwrite,
                 **data_protection(data, dataset))
    model = model_from_options(embed)
    emb = embed.embed(model, dataset)
    config = {"data": str(data), "split": dataset.split or ALL_SPLITS, "model": model.describe(),
              "model_digest": model.weights_digest(), **environment()}
    if embed.distributed is not None:
        config["distributed"] = embed.distributed.describe()
    return save_embeddings(out, emb, config)
