"""The reject option (fewshot.catalogue.reject): 'unknown' for photos of no catalogue article."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import fewshot
from fewshot.catalogue import Catalogue
from fewshot.catalogue.calibrate import Calibration
from fewshot.catalogue.reject import UNKNOWN, Rejector, answers, parse_reject
from fewshot.errors import InputError
from fewshot.index import CatalogueIndex, Prediction


def _preds(*rows):
    return [[Prediction(label, group, score) for label, group, score in row] for row in rows]


def _cal(threshold: float, brand: float | None) -> Calibration:
    return Calibration(score="relative", threshold=threshold, target_far=0.05, present_accepted=0.5, num_present=10,
                       num_absent=10, by="article", seed=0, brand_threshold=brand)


def test_answers_by_hand():
    preds = _preds([("a", "B1", 0.9), ("b", "B2", 0.3)],     # relative 0.75: accepted
                   [("a", "B1", 0.6), ("c", "B1", 0.55), ("b", "B2", 0.2)],  # 0.325: unknown; brand 0.5 >= 0.45
                   [("b", "B2", 0.5), ("a", "B1", 0.45)])    # 0.275: unknown; brand 0.275 < 0.45
    out = answers(Rejector("relative", 0.4, _cal(0.4, 0.45)), preds)
    assert [a.article for a in out] == ["a", UNKNOWN, UNKNOWN]
    assert [a.unknown for a in out] == [False, True, True]
    assert out[0].score == pytest.approx(0.75) and out[1].score == pytest.approx(0.325)
    assert [a.brand for a in out] == [None, "B1", None]
    assert out[1].text() == "unknown article, brand B1" and out[2].text() == "unknown"
    assert out[1].to_dict() == {"article": "unknown", "unknown": True, "score": 0.325, "open_score": "relative",
                                "threshold": 0.4, "target_far": 0.05, "brand": "B1"}
    # no reject: every photo its best article
    assert [a.article for a in answers(Rejector("relative"), preds)] == ["a", "a", "b"]


def test_reject_values():
    assert parse_reject("AUTO") == "auto" and parse_reject(" none") == "none"
    assert parse_reject("0.4") == 0.4 and parse_reject(-1) == -1.0
    for bad in ("maybe", "nan", "inf", True, None):
        with pytest.raises(InputError, match="not auto, none or a score"):
            parse_reject(bad)


def _index(articles: int, photos: int = 3) -> CatalogueIndex:
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(articles, 16)), photos, 0) + 0.3 * rng.normal(size=(articles * photos, 16))
    labels = [f"a{i}" for i in range(articles) for _ in range(photos)]
    return CatalogueIndex.build(x.astype(np.float32), labels, [None] * len(labels), labels, {})


def test_auto_is_cached_until_the_catalogue_changes():
    index = _index(8)
    first = Rejector.for_index(index, "auto")
    assert first.calibration is not None and Rejector.for_index(index).calibration is first.calibration
    index.add_article("new", None, np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32), ["n1", "n2"])
    again = Rejector.for_index(index)
    assert again.calibration is not first.calibration and again.calibration.num_present == first.calibration.num_present + 2


def test_many_targets_reuse_the_scores_and_keep_few_thresholds(monkeypatch):
    import fewshot.catalogue.reject as reject

    index = _index(8)
    calls = []
    real = reject.calibration_scores
    monkeypatch.setattr(reject, "calibration_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    cals = [Rejector.for_index(index, "auto", target_far=f).calibration for f in np.linspace(0.01, 0.5, 30)]
    assert len(calls) == 1  # the scores are made once; each target is a sort
    assert [c.threshold for c in cals] == sorted((c.threshold for c in cals), reverse=True)
    assert sum(k[0] == "calibration" for k in index.derived) == reject.MAX_CACHED


def test_a_catalogue_too_small_falls_back_to_none_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fewshot"):
        r = Rejector.for_index(_index(4), "auto")
    assert r.threshold is None and r.calibration is None
    assert "too few to calibrate" in caplog.text and "reject='none'" in caplog.text


def test_target_far_is_checked():
    for bad in (0, 1, 1.5, "x"):
        with pytest.raises(InputError, match="target_far"):
            Rejector.for_index(_index(8), "auto", target_far=bad)


def test_the_api_answers_unknown(drawn_tree: Path, tmp_path: Path):
    model = fewshot.create_backbone("efficientnet_lite0", image_size=32)
    cat = Catalogue.build(model, fewshot.load_dataset(drawn_tree), runtime="torch")
    photo = sorted(drawn_tree.rglob("*.jpg"))[0]
    auto = cat.classify([photo])[0]
    cal = cat.rejector().calibration
    assert cal is not None and auto.answer.threshold == cal.threshold and auto.answer.target_far == 0.05
    assert auto.unknown == (auto.answer.score < cal.threshold)
    assert len(auto.predictions) == 5  # the nearest articles are listed either way
    never = cat.classify([photo], reject=5.0)[0]  # no relative score reaches 5
    assert never.unknown and never.answer.article == "unknown" and never.predictions[0].label == auto.predictions[0].label
    assert never.to_dict()["answer"]["unknown"] is True
    always = cat.classify([photo], reject="none")[0]
    assert not always.unknown and always.answer.article == always.predictions[0].label


def test_the_calibration_is_stored_with_the_index_and_read_back(tmp_path: Path):
    from fewshot.catalogue import load_index, save_index
    from fewshot.catalogue.calibrate import calibrate

    index = _index(8)
    folder = save_index(index, tmp_path / "idx")
    record = json.loads((folder / "calibration.json").read_text())
    fresh = calibrate(index)
    assert record["calibrated"] and record["threshold"] == fresh.threshold and record["score"] == "relative"
    assert sum(record["histograms"]["absent"]) == fresh.num_absent
    loaded = load_index(folder)
    stored = Rejector.for_index(loaded).calibration
    assert stored == fresh and loaded.derived  # read, not computed again
    (folder / "calibration.json").write_text('{"calibrated": true, "threshold": "high"}')
    again = load_index(folder)
    assert not again.derived and Rejector.for_index(again).calibration == fresh  # a bad record: computed
    for edit in ('"threshold": 0.9', '"threshold": NaN', '"brand_threshold": "x"'):  # edited by hand: not trusted
        good = dict(record)
        text = json.dumps(good).replace(f'"threshold": {record["threshold"]}', edit.split(",")[0], 1) \
            if "brand" not in edit else json.dumps({**good, "brand_threshold": "x"})
        (folder / "calibration.json").write_text(text)
        edited = load_index(folder)
        assert not edited.derived and Rejector.for_index(edited).calibration == fresh, edit
    other = save_index(_index(9), tmp_path / "other")  # another index's record, copied in: not trusted
    (folder / "calibration.json").write_bytes((other / "calibration.json").read_bytes())
    assert not load_index(folder).derived
    small = save_index(_index(4), tmp_path / "small")
    assert json.loads((small / "calibration.json").read_text())["calibrated"] is False
