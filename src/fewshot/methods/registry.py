"""Per-method hooks applied when a run is loaded (e.g. MAML's adapt-on-support classifier)."""

from __future__ import annotations

from typing import Callable

_EXTRAS: dict[str, Callable] = {}


def register_extras(method: str) -> Callable[[Callable], Callable]:
    """Decorator: ``hook(model: EmbeddingModel) -> None`` run when a ``method`` run is loaded."""

    def wrap(fn: Callable) -> Callable:
        _EXTRAS[method] = fn
        return fn

    return wrap


def attach_method_extras(model) -> None:
    """Run the hook registered for the loaded run's method, if any."""
    hook = _EXTRAS.get(model.run_config.get("method", ""))
    if hook is not None:
        hook(model)
