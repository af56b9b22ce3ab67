"""hpo.study.ordered in one process: what a trial's sampler and pruner see, without training (the two-worker runs are in
test_workers.py)."""

import optuna
import pytest
from conftest import study_dict

from hpo import load_study
from hpo.study import ordered
from hpo.study.storage import open_study

GRID = {
    "learning_rate": {"type": "categorical", "choices": [1e-4, 1e-3]},
    "per_device_train_batch_size": {"type": "categorical", "choices": [2, 4, 8, 16]},
}


def test_a_grid_is_walked_once_with_two_workers(tiny_model, tmp_path):
    # each trial's own seed would shuffle the grid anew: points repeated, others never visited
    cfg = load_study(
        study_dict(
            tiny_model, search_space=GRID, sampler={"name": "grid", "seed": 0}, storage=f"sqlite:///{tmp_path}/s.db"
        )
    )
    study = open_study(cfg, workers=2)
    assert isinstance(study.sampler, ordered.OrderedSampler)
    seen = []

    def objective(trial):
        seen.append(tuple(trial.suggest_categorical(name, p["choices"]) for name, p in GRID.items()))
        ordered.mark_sampled(trial)
        return 1.0

    study.optimize(objective, n_trials=8)
    assert len(set(seen)) == 8


@pytest.mark.parametrize(
    "pruner", [optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9), optuna.pruners.WilcoxonPruner()]
)
def test_with_one_worker_the_ordered_pruner_decides_as_the_pruner_alone(pruner):
    # Hyperband reads the storage past any view (hpo asks its bracket pruner itself), Wilcoxon the best trial
    def decisions(p):
        study = optuna.create_study(study_name="same", pruner=p, sampler=optuna.samplers.RandomSampler(seed=0))
        out = []
        for n in range(8):
            trial = study.ask()
            for step in range(1, 10):
                trial.report((n * 7 % 5 + 1) / step, step)
                if trial.should_prune():
                    out.append((n, step))
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(trial, (n * 7 % 5 + 1) / 9)
        return out

    alone = decisions(pruner)
    assert decisions(ordered.OrderedPruner(pruner, lag=1)) == alone and alone
