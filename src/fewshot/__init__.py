"""fewshot: few-shot product recognition framed as image retrieval.

Pipeline (imports flow one way)::

    data -> backbones -> embed -> model -> methods -> metrics -> index -> catalogue -> evaluation -> training -> api -> cli / serve

The Python API (``docs/python-api.md``): :func:`load_dataset`, :func:`create_backbone`,
:func:`load_model`, :class:`Catalogue`, :func:`evaluate`, :func:`train`. They are imported on
first use, as is ``__version__``, so ``import fewshot`` (and every ``fewshot`` command's
start) stays light.
"""

_API = ("load_dataset", "create_backbone", "load_model", "Catalogue", "evaluate", "train")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name == "__version__":
        from .version import __version__

        return __version__
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fewshot' has no attribute {name!r}")
