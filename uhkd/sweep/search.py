"""Search and early stopping that compare like with like: one Optuna TPE study and one ASHA bracket set per pair.

Pairs train at very different speeds (a DeiT student starts slowly where a ResNet18 one does not), so one ASHA
bracket over all pairs stops every slow pair early, and one TPE model then samples only the fast pairs. Here each
pair gets its share of the sample budget (`split_budget`), its own TPE study (`PairSearch`; with `--study DB` they
persist as `<kind>-<preset>-<method>-<objective>/<pair>`), and its own ASHA rungs (`PairASHA`), keyed by `config["pair"]`.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from typing import Any, Callable

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from ..storage import join
from .results import SweepTables
from .spec import Sweep
from .state import relocate


def split_budget(total: int, pairs: list[str]) -> dict[str, int]:
    """`total` samples over `pairs` as evenly as possible (the first pairs take the remainder)."""
    share, extra = divmod(total, len(pairs))
    return {pair: share + (i < extra) for i, pair in enumerate(pairs)}


def pair_seed(seed: int, pair: str) -> int:
    """The seed of `pair`'s TPE sampler: from the sweep's `--seed` and the pair, so the pairs draw different random
    start-up configurations (alike, every pair would try the same few) and the same command draws the same ones."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{pair}".encode()).digest()[:4], "big")


def startup_trials(share: int) -> int:
    """Random start-up trials of a pair with `share` trials, before TPE models it: Optuna's 10, or half the share
    when smaller (at least 1)."""
    return min(10, max(1, share // 2))


def study_name(sweep: Sweep, pair: str) -> str:
    return f"{sweep.kind}-{sweep.preset.name}-{sweep.method}-{sweep.objective}/{pair}"


class PairSearch(Searcher):
    """One searcher per pair (`make(pair)`, e.g. an OptunaSearch with its own study), each over the search space
    without `pair`. Trials go to the pairs in turn (the pair with the fewest trials so far that has budget left), so
    the pairs advance side by side; when every pair has had its budget the search is finished. Results go back to
    that pair's searcher. `tables` (results location, sweep name) are the sweep's rows, read before the first
    suggestion of a session: a trial with a row counts against its pair's budget."""

    def __init__(self, budget: dict[str, int], make: Callable[[str], Searcher], metric: Any, mode: Any,
                 tables: tuple[str, str] | None = None) -> None:
        super().__init__(metric=metric, mode=mode)
        self.budget = dict(budget)
        self.by_pair = {pair: make(pair) for pair in budget}
        self.trial_pair: dict[str, str] = {}
        self.tables = tables
        self._rows_counted = tables is None

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        space = {k: v for k, v in config.items() if k != "pair"}
        return all(s.set_search_properties(metric, mode, space, **spec) for s in self.by_pair.values())

    def suggest(self, trial_id: str) -> dict | None:
        if not self._rows_counted:
            self._rows_counted = True
            self._count_unsaved_trials()
        used = {pair: 0 for pair in self.budget}
        for pair in self.trial_pair.values():
            used[pair] += 1
        open_pairs = [pair for pair, n in self.budget.items() if used[pair] < n]
        if not open_pairs:
            return Searcher.FINISHED
        pair = min(open_pairs, key=lambda p: used[p])  # the first such pair on ties: a stable order
        config = self.by_pair[pair].suggest(trial_id)
        if config is None or config == Searcher.FINISHED:
            return config
        self.trial_pair[trial_id] = pair
        return {**config, "pair": pair}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.by_pair[self.trial_pair[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.trial_pair:
            self.by_pair[self.trial_pair[trial_id]].on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        state.pop("tables", None)  # where the sweep is now, not where it was when the state was saved
        state.pop("_rows_counted", None)
        self.__dict__.update(state)

    def _count_unsaved_trials(self) -> None:
        """A trial with a row that this searcher's state does not hold is counted as used, so that the sweep samples
        no replacement beside it: one that started and ended within Tune's state-saving period
        (TUNE_GLOBAL_CHECKPOINT_S) before the driver died (Tune's state and this searcher's are saved together), or
        every trial with a row when the search starts afresh on a resume (Tune's state was cut off mid-write)."""
        for trial_id, row in SweepTables(*self.tables).load().trials.items():
            if trial_id not in self.trial_pair and row.get("pair") in self.budget:
                self.trial_pair[trial_id] = row["pair"]


class SweepScheduler(FIFOScheduler):
    """Tune's FIFO scheduling, keeping every trial where the sweep is now: each trial Tune adds (restored, or
    created by a restored search) is pointed at the sweep's location (`relocate`: a moved sweep writes under the
    `--results` it was resumed with). `tables`: (results location, sweep name)."""

    def __init__(self, tables: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.tables = tables

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if self.tables:
            relocate(trial, join(*self.tables))


class PairASHA(SweepScheduler):
    """ASHA within each pair: one `ASHAScheduler` (its own rungs) per `config["pair"]`, made on the pair's first
    trial. A trial is stopped only for trailing trials of its own pair, and a stopped trial stays stopped: on a
    resumed sweep, a trial whose row says it was stopped is not continued, even where Tune's saved state (up to
    TUNE_GLOBAL_CHECKPOINT_S old) still has it running."""

    def __init__(self, tables: tuple[str, str] | None = None, **asha: Any) -> None:
        super().__init__(tables)
        self.asha = asha
        self.by_pair: dict[str, ASHAScheduler] = {}
        self._stopped_rows_checked = tables is None

    def _of(self, trial: Any) -> ASHAScheduler:
        pair = trial.config.get("pair", "")
        if pair not in self.by_pair:
            self.by_pair[pair] = ASHAScheduler(**self.asha)
        return self.by_pair[pair]

    def set_search_properties(self, metric: Any, mode: Any, **spec: Any) -> bool:
        return True  # every per-pair ASHA has its own metric and mode

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        self._of(trial).on_trial_add(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        if not self._stopped_rows_checked:  # once, before this session starts any trial
            self._stopped_rows_checked = True
            rows = SweepTables(*self.tables).load().trials
            for trial in tune_controller.get_trials():
                if trial.status in ("PENDING", "PAUSED") and rows.get(trial.trial_id, {}).get("status") == "stopped":
                    tune_controller.stop_trial(trial)
        return super().choose_trial_to_run(tune_controller)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "ASHA per pair: " + "; ".join(
            f"{pair}: {s.debug_string().splitlines()[0]}" for pair, s in self.by_pair.items())


def searcher(sweep: Sweep, seed: int, planned: int, max_concurrent: int, tables: tuple[str, str]) -> Searcher:
    """TPE per pair of the sweep's `pair` domain, `planned` samples split across the pairs, each pair's sampler seeded
    from `seed` and the pair (`pair_seed`). `tables`: where the sweep's rows are (results location, sweep name)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sweep.objective == "pareto":
        metric: Any = ["best_top1", sweep.pareto_metric]
        mode: Any = ["max", "min" if sweep.pareto_metric == "student_params" else "max"]
    else:
        metric, mode = "best_top1", "max"
    storage = None
    if sweep.study:
        storage = optuna.storages.RDBStorage(f"sqlite:///{os.path.abspath(os.path.expanduser(sweep.study))}")

    budget = split_budget(planned, list(sweep.space["pair"].categories))

    def make(pair: str) -> OptunaSearch:
        sampler = optuna.samplers.TPESampler(seed=pair_seed(seed, pair), n_startup_trials=startup_trials(budget[pair]))
        return OptunaSearch(metric=metric, mode=mode, sampler=sampler, storage=storage,
                            study_name=study_name(sweep, pair) if storage else None)

    return ConcurrencyLimiter(PairSearch(budget, make, metric, mode, tables), max_concurrent=max_concurrent)


def scheduler(sweep: Sweep, budget: dict, max_epochs: int,
              tables: tuple[str, str] | None = None) -> TrialScheduler:
    """FIFO, or ASHA per pair; `tables`: where the sweep's rows are (results location, sweep name)."""
    if not sweep.asha:
        return SweepScheduler(tables)
    # max_t above the epoch count: ASHA stops a trial that reaches max_t, and a finishing trial must not be killed
    return PairASHA(tables, time_attr="epoch", metric="top1", mode="max", max_t=max_epochs + 1,
                    grace_period=int(budget.get("grace_period", 1)),
                    reduction_factor=float(budget.get("reduction_factor", 2)))
