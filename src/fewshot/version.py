"""The package version (a shared helper: every layer may import it, and it imports nothing of ours)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("fewshot")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
