"""fewshot: few-shot product recognition framed as image retrieval.

Pipeline (imports flow one way)::

    data -> backbones -> embed -> methods -> metrics -> index -> cli / serve
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("fewshot")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
