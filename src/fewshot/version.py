"""The package version, and the environment recorded in result files (a shared helper: every
layer may import it, and it imports nothing of ours)."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("fewshot")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+source"

__all__ = ["__version__", "environment"]


def environment() -> dict:
    """Package version, torch version and thread count, for result files."""
    import datetime as dt
    import platform

    import torch  # here, so that ``import fewshot`` stays light

    return {"fewshot_version": __version__, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
