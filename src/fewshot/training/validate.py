"""Validation after every epoch: val MAP@R (which picks the best epoch), mAP, P@1 and N-way
K-shot accuracy of the current model on the val classes."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..errors import DataError
from ..methods import Method
from .config import TrainConfig
from .data import RunData
from .finetune import FineTune

log = logging.getLogger("fewshot")


# --------------------------------------------------------------------------- validation
@torch.no_grad()
def _head_embed(method: Method, x: torch.Tensor, batch: int = 4096) -> np.ndarray:
    method.train_mode(False)
    out = [method.embed(x[i:i + batch].to(method.device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out).numpy()


def validate_epoch(method: Method, data: RunData, cfg: TrainConfig, ft: FineTune | None, epoch: int) -> dict:
    """The val metrics of the current model after ``epoch``: ``val_map``, ``val_map_at_r``,
    ``val_precision_at_1`` and ``val_episodic_acc`` (``None`` when episodic validation is off or impossible)."""
    from ..metrics import episodic_accuracy, retrieval_metrics

    if ft is not None:
        xq, xg = ft.embed_banks(ft.val_q_bank, ft.val_g_bank)
    else:
        xq, xg = torch.from_numpy(data.val_q.vectors), torch.from_numpy(data.val_g.vectors)
    q, g = _head_embed(method, xq), _head_embed(method, xg)
    rep = retrieval_metrics(q, data.val_q.labels, g, data.val_g.labels)
    episodic = None
    if cfg.val_episodes > 0:
        try:
            res = episodic_accuracy(g, data.val_g.labels, n_way=cfg.ways, k_shot=cfg.shots,
                                    n_query=cfg.queries, episodes=cfg.val_episodes, seed=cfg.seed,
                                    query_embeddings=q, query_labels=data.val_q.labels,
                                    classifier=method.episode_classifier(), warn=epoch == 0)
            episodic = res.accuracy
        except DataError as exc:
            if epoch == 0:
                log.warning("episodic validation skipped: %s", exc.message)
    return {"val_map": _f(rep.map), "val_map_at_r": _f(rep.map_at_r),
            "val_precision_at_1": _f(rep.precision_at_1), "val_episodic_acc": episodic}


def _f(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x
