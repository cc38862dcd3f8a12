"""The rules for defaults that depend on other settings, in one place: :func:`make_config`.

A :class:`~fewshot.training.config.TrainConfig` field's own default is in its declaration;
what changes it: the method's :attr:`~fewshot.methods.base.Method.defaults` (e.g. its learning
rate), and fine-tuning (:data:`DEFAULT_FINE_TUNE`, shorter runs: :data:`FINE_TUNE_LENGTH`,
:data:`FINE_TUNE_EPISODES`). ``fewshot train`` and the Python API both go through
:func:`make_config`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ..backbones import default_fine_tune
from ..methods import get_method, list_methods, method_options
from .config import TrainConfig, parse_fine_tune

__all__ = ["make_config", "config_keys", "DEFAULT_FINE_TUNE", "FINE_TUNE_LENGTH", "FINE_TUNE_EPISODES"]

#: what :func:`make_config` (and so ``fewshot train``) fine-tunes when neither ``fine_tune`` nor
#: the method's :attr:`Method.defaults` says, for a backbone that declares nothing
#: (:func:`~fewshot.backbones.default_fine_tune`; EfficientNet-Lite declares its blocks after the
#: stem and the 1/2- and 1/4-resolution stages). From bench/quality_finetune.py
#: (docs/guides/training.md, "Fine-tuning the feature extractor"): on the unseen Grocery test
#: classes ``all`` beat ``last:2`` for every method (MAP@R triplet 0.563 vs 0.527, contrastive
#: 0.555 vs 0.488, protonet 0.577 vs 0.526, maml 0.562 vs 0.462) and peaked sooner
DEFAULT_FINE_TUNE = "all"
#: loop lengths when fine-tuning and neither the caller nor the method's
#: :attr:`Method.fine_tune_defaults` set them (triplet and contrastive: 3 epochs; every epoch runs
#: the backbone forward and backward, so the head-only defaults of 30 epochs / 2,000 episodes would
#: take hours on CPU).
#: 4 epochs: every siamese run at its default rates peaked by epoch 3 (bench/quality_finetune.py:
#: triplet all 1, 2, 2, 3; contrastive all 1; last:2 2-3), and the 5th epoch put triplet's
#: default run over 20 minutes on 2 AMD EPYC cores (21.0 min, best epoch 3; 17.4 min for 4)
FINE_TUNE_LENGTH: dict[str, int] = {"epochs": 4, "patience": 2}
#: episodes of an episodic method when fine-tuning: ``all`` and ``last:13`` (Lite0) peaked after
#: 100-200 (protonet 15 min, maml 13 min for 200 on 2 cores), ``last:2`` after 300: a tail of at
#: most :data:`SHORT_TAIL` blocks learns slower
FINE_TUNE_EPISODES: dict[str, int] = {"all": 200, "last": 200, "short tail": 300}
SHORT_TAIL = 3


def make_config(method: str, **given: Any) -> TrainConfig:
    """A :class:`TrainConfig` for ``method``: field defaults, then the method's
    :attr:`Method.defaults`, then every ``given`` value that is not ``None``; without a
    ``fine_tune``, :data:`DEFAULT_FINE_TUNE`, and when fine-tuning, :data:`FINE_TUNE_LENGTH` /
    :data:`FINE_TUNE_EPISODES` for the loop lengths not given. A ``given`` key
    that is one of the method's options (its :attr:`Method.Config`) goes into ``options``.

    Raises:
        FewshotError: unknown method, an option of another method (not this one's), or a
            bad value (``options`` names it).
        TypeError: a ``given`` key is neither a :class:`TrainConfig` field nor an option of any
            registered method.
    """
    loop = _loop_fields()
    anyone = {f.name for m in list_methods() for f in fields(get_method(m).Config)}
    unknown = sorted(set(given) - loop - anyone - {"options"})
    if unknown:
        raise TypeError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
    values: dict[str, Any] = dict(get_method(method).defaults)
    values.update({k: v for k, v in given.items() if k in loop and v is not None})
    opts = dict(given.get("options") or {})
    opts.update({k: v for k, v in given.items() if k not in loop and k != "options" and v is not None})
    _fine_tune_defaults(method, values, opts)
    values["method"] = method
    values["options"] = method_options(method, **opts)
    return TrainConfig(**values)


def _fine_tune_defaults(method: str, values: dict[str, Any], opts: dict[str, Any]) -> None:
    """Fill in :data:`DEFAULT_FINE_TUNE` and, when fine-tuning, the shorter loop lengths the
    caller did not set (in place)."""
    if "fine_tune" not in values:  # the backbone's choice; DEFAULT_FINE_TUNE for one that declares none
        values["fine_tune"] = default_fine_tune(values.get("backbone", TrainConfig.backbone),
                                                values.get("pretrained", True), fallback=DEFAULT_FINE_TUNE)
    mode, blocks = parse_fine_tune(values["fine_tune"], values.get("fine_tune_blocks", 2))
    if mode == "none":
        return
    for key, value in {**FINE_TUNE_LENGTH, **get_method(method).fine_tune_defaults}.items():
        values.setdefault(key, value)
    if get_method(method).episodic and "episodes" in {f.name for f in fields(get_method(method).Config)}:
        opts.setdefault("episodes", FINE_TUNE_EPISODES["short tail" if mode == "last" and blocks <= SHORT_TAIL
                                                       else mode])


def _loop_fields() -> set[str]:
    return {f.name for f in fields(TrainConfig)} - {"options"}


def config_keys(method: str) -> set[str]:
    """The keys :func:`make_config` takes for ``method``: the loop's fields and its options."""
    return _loop_fields() | {f.name for f in fields(get_method(method).Config)}
