"""The pair search compares like with like: each pair gets its share of the samples and its own TPE study (kept in
SQLite under a per-pair name, restored on --resume), and ASHA stops a trial only for trailing trials of its pair."""
from __future__ import annotations

import re

import optuna
import pandas as pd
from ray import tune

from uhkd.sweep.search import PairASHA, PairSearch, scheduler, searcher, split_budget, study_name
from uhkd.sweep.spec import Sweep, load_preset

PAIRS = ["a:r18", "b:deit", "c:resmlp"]


def _sweep(pairs, study=""):
    space = {"pair": tune.choice(pairs), "x": tune.uniform(0.0, 1.0)}
    return Sweep("hetero_pairs", load_preset("quick"), method="uhkd", space=space, asha=True, study=study)


def test_split_budget():
    assert split_budget(7, PAIRS) == {"a:r18": 3, "b:deit": 2, "c:resmlp": 2}
    assert split_budget(2, PAIRS) == {"a:r18": 1, "b:deit": 1, "c:resmlp": 0}


def _base(limited):
    return limited.searcher  # the PairSearch inside the ConcurrencyLimiter


def test_each_pair_its_share_and_its_own_persistent_study(tmp_path):
    db = tmp_path / "study.db"
    sweep = _sweep(PAIRS, study=str(db))
    search = _base(searcher(sweep, seed=0, planned=7, max_concurrent=7, tables=(str(tmp_path), "sw")))
    assert isinstance(search, PairSearch)
    assert search.set_search_properties(None, None, dict(sweep.space))
    configs = {f"t{i}": search.suggest(f"t{i}") for i in range(4)}
    assert [c["pair"] for c in configs.values()] == ["a:r18", "b:deit", "c:resmlp", "a:r18"]
    assert all(set(c) == {"pair", "x"} for c in configs.values())
    search.on_trial_complete("t0", {"best_top1": 10.0, "training_iteration": 1})

    # --resume: Tune restores the searcher from its saved state; pending trials complete into their own studies
    search.save(str(tmp_path / "searcher.pkl"))
    restored = _base(searcher(sweep, seed=0, planned=7, max_concurrent=7, tables=(str(tmp_path), "sw")))
    restored.restore(str(tmp_path / "searcher.pkl"))
    for trial_id in ("t1", "t2", "t3"):
        restored.on_trial_complete(trial_id, {"best_top1": 20.0, "training_iteration": 1})
    more = [restored.suggest(f"u{i}") for i in range(4)]
    assert [c["pair"] for c in more[:3]] == ["b:deit", "c:resmlp", "a:r18"] and more[3] == PairSearch.FINISHED
    for i in range(3):
        restored.on_trial_complete(f"u{i}", {"best_top1": 30.0, "training_iteration": 1})

    storage = f"sqlite:///{db}"
    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    assert studies == {study_name(sweep, "a:r18"): 3, study_name(sweep, "b:deit"): 2,
                       study_name(sweep, "c:resmlp"): 2}
    assert study_name(sweep, "a:r18") == "hetero_pairs-quick-uhkd-accuracy/a:r18"
    completed = optuna.load_study(study_name=study_name(sweep, "b:deit"), storage=storage).trials
    assert [t.value for t in completed] == [20.0, 30.0] and all("x" in t.params for t in completed)


def test_each_pair_draws_its_own_start_up_configurations_and_the_same_again(tmp_path):
    """Seeded from the sweep seed and the pair: the pairs' first trials differ (alike, the "searched" settings of
    every pair would be one random draw), and the same seed draws the same ones again; another seed, others."""
    def first_draws(seed: int) -> dict[str, float]:
        sweep = _sweep(PAIRS)
        search = _base(searcher(sweep, seed=seed, planned=6, max_concurrent=6, tables=(str(tmp_path), "sw")))
        search.set_search_properties(None, None, dict(sweep.space))
        return {c["pair"]: c["x"] for c in (search.suggest(f"t{i}") for i in range(3))}

    draws = first_draws(0)
    assert set(draws) == set(PAIRS) and len(set(draws.values())) == 3
    assert first_draws(0) == draws and first_draws(1) != draws


def test_the_plan_line_says_when_a_pair_is_a_smoke_test_not_a_search():
    from uhkd.sweep.console import plan_lines
    from uhkd.sweep.search import startup_trials

    assert [startup_trials(n) for n in (1, 2, 4, 20, 40)] == [1, 1, 2, 10, 10]  # Optuna's 10, at most half
    lines = plan_lines("sw", 4, [3, 3], 2, 1, "/r/sw", split_budget(4, PAIRS), seed=5)
    assert lines[0] == ("sweep sw: 4 trial(s) of 3 epoch(s), 2 at once, each in its Tune trial's own process (no Ray "
                        "Train); results in /r/sw")
    assert lines[1].endswith("a:r18 2 (1 random), b:deit 1 (1 random), c:resmlp 1 (1 random)")
    assert lines[2].startswith("note: b:deit, c:resmlp: no more trials than the random start-up, so a smoke test")
    grid = plan_lines("g", 6, [2, 5], 1, 4, "s3://b/r/g?scheme=http")
    assert grid == ["sweep g: 6 trial(s) of 2-5 epoch(s), 1 at once, each a Ray Train run of 4 workers; results in "
                    "'s3://b/r/g?scheme=http'"]


def test_a_trial_that_ended_after_the_last_saved_state_counts_on_resume(tmp_path):
    """Its row is written, but Tune's state (and the searcher's, saved with it) was saved before it began: the
    restored search counts it, so the sweep samples no replacement beside it."""
    from uhkd.sweep.results import SweepTables

    sweep = _sweep(PAIRS[:2])
    search = _base(searcher(sweep, seed=0, planned=4, max_concurrent=4, tables=(str(tmp_path), "sw")))
    search.set_search_properties(None, None, dict(sweep.space))
    assert [search.suggest(t)["pair"] for t in ("t0", "t1")] == ["a:r18", "b:deit"]
    search.save(str(tmp_path / "searcher.pkl"))
    assert search.suggest("t2")["pair"] == "a:r18"  # after the save: t2 ends, its row is written, the driver dies
    SweepTables(str(tmp_path), "sw").write_trial({"trial_id": "t2", "pair": "a:r18", "status": "stopped"})

    restored = _base(searcher(sweep, seed=0, planned=4, max_concurrent=4, tables=(str(tmp_path), "sw")))
    restored.set_search_properties(None, None, dict(sweep.space))
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("u0")["pair"] == "b:deit" and restored.suggest("u1") == PairSearch.FINISHED


def test_a_search_started_afresh_on_resume_counts_the_rows_already_written(tmp_path):
    """Tune's state was cut off mid-write, so the resume starts the search afresh: the trials with rows count against
    their pairs' budgets (planned 4 over two pairs, 2 each), and only what is left is sampled."""
    from uhkd.sweep.results import SweepTables

    tables = SweepTables(str(tmp_path), "sw")
    for trial_id, pair in (("t0", "a:r18"), ("t1", "b:deit"), ("t2", "a:r18")):
        tables.write_trial({"trial_id": trial_id, "pair": pair, "status": "ok"})
    sweep = _sweep(PAIRS[:2])
    fresh = _base(searcher(sweep, seed=0, planned=4, max_concurrent=4, tables=(str(tmp_path), "sw")))
    fresh.set_search_properties(None, None, dict(sweep.space))
    assert fresh.suggest("u0")["pair"] == "b:deit" and fresh.suggest("u1") == PairSearch.FINISHED


def test_asha_stops_trials_only_against_their_own_pair(ray_local, tmp_path):
    """Trials run one at a time, pairs alternating (a, b, a, b): the first trial of the slow pair `b` finds its
    pair's rungs empty and runs all 4 epochs, though it trails every trial of `a` (one ASHA over both pairs stops it
    at epoch 1)."""
    def trainable(config):  # defined here so that Ray ships it by value (the tests folder is no package)
        base = 50.0 if config["pair"].startswith("a") else 0.0  # a slow-starting pair far below a fast one
        best = 0.0
        for epoch in range(1, 5):
            top1 = base + 10 * config["x"] * epoch  # within a pair, larger x is better
            best = max(best, top1)
            tune.report({"epoch": epoch, "top1": top1, "best_top1": best})

    sweep = _sweep(["a:r18", "b:deit"])
    asha = scheduler(sweep, {"grace_period": 1, "reduction_factor": 2}, max_epochs=4)
    assert isinstance(asha, PairASHA)
    tuner = tune.Tuner(trainable, param_space=dict(sweep.space), tune_config=tune.TuneConfig(
        search_alg=searcher(sweep, seed=1, planned=4, max_concurrent=1, tables=(str(tmp_path), "sw")),
        scheduler=asha, num_samples=4,
        reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="t", verbose=0))
    results = sorted(tuner.fit(), key=lambda r: int(re.search(r"_(\d+)_pair=", r.path).group(1)))  # creation order
    frame = pd.DataFrame([{**r.metrics, "config/pair": r.config["pair"]} for r in results])
    assert frame["config/pair"].tolist() == ["a:r18", "b:deit"] * 2
    a, b = frame[frame["config/pair"] == "a:r18"], frame[frame["config/pair"] == "b:deit"]
    assert b.iloc[0]["epoch"] == 4 and b.iloc[0]["top1"] < a["top1"].min()
