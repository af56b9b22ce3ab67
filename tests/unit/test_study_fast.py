"""A study's parts on a tiny BERT without a study run: batches, eval order, dropout, the best model's moment,
precision (the end-to-end runs are in integration/test_study.py)."""

import json

import optuna

from hpo import load_study
from hpo.trial.plan import make_plan
from hpo.trial.workbench import prepare


def test_eval_rows_are_sorted_by_length_once(write_study):
    lengths = [len(row["input_ids"]) for row in prepare(load_study(write_study(n_trials=1))).eval_rows]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_dropout_reaches_the_model_config(write_study, tiny_model):
    from hpo.trial.model import build_model
    from hpo.trial.workbench import prepare

    bench = prepare(load_study(write_study()))
    model, _ = build_model(bench, make_plan(bench.cfg, {"dropout": 0.37}))
    assert model.config.hidden_dropout_prob == 0.37
    assert model.config.attention_probs_dropout_prob == 0.37
    assert model.config.num_labels == 3


def test_best_model_is_decided_after_values_are_stored(write_study):
    # Two workers each stage a model that beats the best stored so far. Whatever order their after-tell
    # steps run in, best_model/ ends up holding the study's best, and the loser's staged model is removed.
    from hpo.study.outputs import _staged, install_if_best

    for order in ("worse first", "better first"):
        cfg = load_study(write_study(study=order.replace(" ", "-")))
        study = optuna.create_study(study_name=cfg.study, storage=cfg.storage_url)
        better, worse = study.ask(), study.ask()
        for trial in (better, worse):
            _staged(cfg, trial.number).mkdir(parents=True)
            (_staged(cfg, trial.number) / "hpo_trial.json").write_text(json.dumps({"trial": trial.number}))
        if order == "worse first":
            study.tell(worse, 0.5)
            install_if_best(cfg, study, study.trials[worse.number])  # the better one still runs: its model stays staged
            assert _staged(cfg, better.number).exists()
            study.tell(better, 0.3)
            install_if_best(cfg, study, study.trials[better.number])
        else:
            study.tell(better, 0.3)
            study.tell(worse, 0.5)
            install_if_best(cfg, study, study.trials[worse.number])  # the worse one's step runs last
            install_if_best(cfg, study, study.trials[better.number])
        saved = json.loads((cfg.output_path / "best_model" / "hpo_trial.json").read_text())
        assert saved["trial"] == study.best_trial.number == better.number, order
        assert not (cfg.output_path / ".staged").exists()


def test_a_chosen_precision_is_kept():
    from hpo.trial.model import precision

    assert precision({}, cuda=True, bf16_supported=True) == {"bf16": True}
    assert precision({}, cuda=True, bf16_supported=False) == {"fp16": True}
    assert precision({"fp16": True}, cuda=True, bf16_supported=True) == {}  # was bf16 too: every trial failed
    assert precision({"bf16": False}, cuda=True, bf16_supported=True) == {}
    assert precision({"fp16": True}, cuda=False, bf16_supported=False) == {"dataloader_pin_memory": False}
