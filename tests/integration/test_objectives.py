"""Several objectives: a Pareto front of real MiniLM fine-tunes on the quickstart data, reported and picked from."""

from conftest import quickstart
from rich.console import Console

import hpo


def dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def test_a_two_objective_study_keeps_a_front_that_best_picks_from(tmp_path):
    study = quickstart(tmp_path, n_trials=5, objectives=[{"metric": "eval_loss"}, {"metric": "eval_latency_ms"}])
    result = hpo.run(study, console=Console(quiet=True))
    trials = result.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5 and all(len(t.values) == 2 for t in trials)
    assert all(t.values[1] == t.user_attrs["eval_latency_ms"] > 0 for t in trials)
    assert all(not t.intermediate_values for t in trials)  # Optuna takes no reports from such a study

    report = hpo.report(study, html=tmp_path / "report.html")
    front = set(report.trials.loc[report.trials["pareto"], "trial"])
    values = {t.number: t.values for t in trials}
    for number in front:  # nothing beats a front trial on both objectives
        assert not any(dominates(values[other], values[number]) for other in values)
    for number in set(values) - front:  # and every other trial is beaten by one of the front
        assert any(dominates(values[f], values[number]) for f in front)
    assert "Pareto front" in (tmp_path / "report.html").read_text()

    latency = sorted(values[n][1] for n in front)[len(front) // 2]
    _, rest = hpo.best(study, pick=f"eval_latency_ms <= {latency}")
    expected = min((n for n in front if values[n][1] <= latency), key=lambda n: (values[n][0], n))
    assert rest["trial"] == expected and rest["values"]["eval_latency_ms"] == values[expected][1]
