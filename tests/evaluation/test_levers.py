"""Re-ranking and transductive episodes wired into `fewshot evaluate` and fewshot.evaluate:
recorded, reported, and refused where they do not apply."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fewshot.cli import app
from fewshot.errors import InputError
from test_openset_eval import _drawn_manifest


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    import fewshot
    from fewshot.data.splits import ClassSplit

    root = tmp_path_factory.mktemp("levers")
    manifest, labels = _drawn_manifest(root / "data", train=5, test=6)
    split = root / "split.json"
    ClassSplit(name="drawn", seed=0, train=[], val=[], test=sorted(labels)).save(split)
    return root, manifest, split, fewshot.create_backbone("efficientnet_lite0", image_size=32)


def test_evaluate_records_and_reports_the_levers(drawn, monkeypatch):
    import fewshot

    root, manifest, split, model = drawn
    monkeypatch.setenv("FEWSHOT_CACHE", str(root / "cache"))
    ds = fewshot.load_dataset(manifest)
    plain = fewshot.evaluate(model, ds, split_file=split, episodes=40, n_query=2, runtime="torch")
    m = fewshot.evaluate(model, ds, split_file=split, episodes=40, n_query=2, runtime="torch", out=root / "ev",
                         rerank={"kind": "dba-qe", "k": 2}, transductive="bdcspn", query_imbalance=2.0)
    c = m["config"]
    assert c["rerank"] == {"kind": "dba-qe", "k": 2, "alpha": 1.0}
    assert c["transductive"] == "bdcspn" and c["query_imbalance"] == 2.0
    assert m["episodes"]["5way1shot"]["transductive"] == "bdcspn"
    assert m["map_at_r"] != plain["map_at_r"] and m["num_queries"] == plain["num_queries"]
    assert m["episodes"]["5way1shot"]["accuracy"] != plain["episodes"]["5way1shot"]["accuracy"]
    report = (root / "ev" / "report.md").read_text()
    assert "re-ranked by `dba-qe` (k 2, alpha 1.0)" in report and "transductively (`bdcspn`)" in report
    assert "Dirichlet(2.0)" in report
    saved = json.loads((root / "ev" / "metrics.json").read_text())
    assert saved["map_at_r"] == pytest.approx(m["map_at_r"])
    kr = fewshot.evaluate(model, ds, split_file=split, episodes=40, n_query=2, runtime="torch", rerank="k-reciprocal",
                          transductive="centre")
    assert kr["config"]["rerank"] == {"kind": "k-reciprocal", "k1": 20, "k2": 6, "lam": 0.3}
    assert 0 < kr["map_at_r"] <= 1 and kr["map_at_r"] != plain["map_at_r"]


def test_levers_are_refused_where_they_do_not_apply(drawn):
    import fewshot

    root, manifest, split, model = drawn
    ds = fewshot.load_dataset(manifest)
    for kwargs, name in (({"rerank": "dba"}, "rerank"), ({"split_file": split, "rerank": "magic"}, "kind"),
                         ({"split_file": split, "transductive": "magic"}, "transductive"),
                         ({"split_file": split, "query_imbalance": -1.0}, "query_imbalance")):
        with pytest.raises(ValueError) as exc:
            fewshot.evaluate(model, ds, episodes=5, **kwargs)
        assert name in exc.value.options, kwargs


def test_the_cli_names_the_flags(tmp_path):
    for args, flag in ((["--rerank", "magic"], "--rerank"), (["--rerank", "dba"], "--rerank"),
                       (["--transductive", "magic"], "--transductive"), (["--query-imbalance", "0"], "--query-imbalance")):
        r = CliRunner().invoke(app, ["evaluate", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "ev"),
                                     *args])
        assert r.exit_code == 1 and flag in r.output and "Traceback" not in r.output, (args, r.output)
        assert not (tmp_path / "ev").exists()


def test_a_maml_model_keeps_its_own_classifier_and_a_protonet_run_may_change_it():
    from fewshot.evaluation.levers import adapts, check_levers
    from fewshot.methods.adapt import make_adapt_classifier
    from fewshot.methods.protonet import ProtoNet

    maml = make_adapt_classifier(init="zero", scale=10.0, lr=0.1, steps=1)
    assert adapts(maml) and not adapts(ProtoNet.episode_classifier(None)) and not adapts(None)
    with pytest.raises(InputError, match="MAML"):
        check_levers("none", "tim", None, gallery=True, model_classifier=adapts(maml))
    assert check_levers("qe", "none", None, gallery=True, model_classifier=True).kind == "qe"
    assert check_levers("none", "tim", None, gallery=True,
                        model_classifier=adapts(ProtoNet.episode_classifier(None))).kind == "none"


def test_the_cli_says_when_figures_are_re_ranked_or_transductive(drawn, monkeypatch):
    root, manifest, split, _ = drawn
    monkeypatch.setenv("FEWSHOT_CACHE", str(root / "cache"))
    r = CliRunner().invoke(app, ["evaluate", "--data", str(manifest), "--split-file", str(split), "--episodes", "30",
                                 "--queries", "2", "--image-size", "32", "--runtime", "torch", "--no-progress",
                                 "--rerank", "dba-qe", "--rerank-k", "3", "--transductive", "bdcspn",
                                 "--out", str(root / "cli-ev")])
    assert r.exit_code == 0, r.output
    assert "[gallery re-ranked: dba-qe]" in r.output
    assert "episodes: bdcspn, balanced queries; transductive gains assume" in r.output
    saved = json.loads((root / "cli-ev" / "metrics.json").read_text())["config"]
    assert saved["rerank"] == {"kind": "dba-qe", "k": 3, "alpha": 1.0} and saved["transductive"] == "bdcspn"


def test_whiten_through_the_cli_is_recorded_reported_and_leaves_episodes_alone(drawn, monkeypatch):
    root, manifest, split, _ = drawn
    monkeypatch.setenv("FEWSHOT_CACHE", str(root / "cache"))
    base = ["evaluate", "--data", str(manifest), "--split-file", str(split), "--episodes", "30", "--queries", "2",
            "--image-size", "32", "--runtime", "torch", "--no-progress"]
    plain = CliRunner().invoke(app, [*base, "--out", str(root / "plain-ev")])
    r = CliRunner().invoke(app, [*base, "--whiten", "--out", str(root / "white-ev")])
    assert plain.exit_code == 0 and r.exit_code == 0, r.output
    assert "[gallery whitened: episodes are not]" in r.output
    p, w = (json.loads((root / d / "metrics.json").read_text()) for d in ("plain-ev", "white-ev"))
    assert w["config"]["whiten"]["photos"] == 60 and w["config"]["whiten"]["articles"] == 12
    assert p["config"]["whiten"] is None and w["map_at_r"] != p["map_at_r"]
    assert w["episodes"]["5way1shot"]["accuracy"] == p["episodes"]["5way1shot"]["accuracy"]
    report = (root / "white-ev" / "report.md").read_text()
    assert "whitened by the gallery's within-article covariance (60 photos of 12 articles" in report
    assert "open-set catalogue" not in report  # no --open-set: the report does not claim one
    r = CliRunner().invoke(app, ["evaluate", "--data", str(manifest), "--whiten", "--out", str(root / "loo-ev")])
    assert r.exit_code == 1 and "--whiten" in r.output and "--split-file" in r.output and "Traceback" not in r.output


def test_whiten_pools_the_runs_prior_into_the_gallery_and_every_open_set_draw(drawn, monkeypatch):
    import fewshot
    import fewshot.evaluation.run as run
    from fewshot.index.whiten import within_stats

    root, manifest, split, model = drawn
    monkeypatch.setenv("FEWSHOT_CACHE", str(root / "cache"))
    rng = np.random.default_rng(0)
    prior = within_stats(rng.normal(size=(40, model.dim)).astype(np.float32), [f"t{i // 4}" for i in range(40)])
    ds = fewshot.load_dataset(manifest)
    kw = dict(split_file=split, episodes=30, n_query=2, runtime="torch", whiten=True, open_set=True, open_set_draws=2)
    alone = fewshot.evaluate(model, ds, **kw)
    monkeypatch.setattr(run, "load_prior", lambda m, labels=None, digests=None: prior)  # as a run's whitening-prior.safetensors gives it
    pooled = fewshot.evaluate(model, ds, out=root / "prior-ev", **kw)
    assert alone["config"]["whiten"]["prior"] is None and alone["open_set"]["protocol"]["whiten_prior"] is None
    assert pooled["config"]["whiten"]["prior"]["photos"] == 40
    assert pooled["open_set"]["protocol"]["whiten_prior"] == pooled["config"]["whiten"]["prior"]
    assert pooled["map_at_r"] != alone["map_at_r"]
    assert (pooled["open_set"]["scores"]["relative"]["auroc"]["mean"]
            != alone["open_set"]["scores"]["relative"]["auroc"]["mean"])
    report = (root / "prior-ev" / "report.md").read_text()
    assert "the run's 40 training photos of 10 articles pooled in" in report
    assert "each open-set catalogue by its own (the same training photos pooled in)" in report
