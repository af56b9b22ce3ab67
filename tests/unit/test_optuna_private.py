"""hpo's reads of Optuna's private names (hpo.optuna_private), one test each, against real studies (SQLite, in
memory): the name is there and means what hpo takes it to mean. An Optuna release that breaks one fails here."""

import sqlite3

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import InMemoryStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from hpo import optuna_private
from hpo.optuna_private import FIXED_PARAMS, RETRY_HISTORY, StudyView

X = FloatDistribution(0.0, 1.0)


@pytest.fixture(autouse=True)
def _quiet():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created" for each study
    yield
    optuna.logging.set_verbosity(verbosity)


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return tmp_path_factory.mktemp("optuna") / "optuna.db"  # one file: Optuna makes its tables once


@pytest.fixture
def url(database) -> str:
    return f"sqlite:///{database}"


@pytest.fixture
def name(request) -> str:
    return request.node.name


def _ask(study: optuna.Study, value: float | None = None) -> optuna.Trial:
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    if value is not None:
        study.tell(trial, value)
    return trial


class _Hidden(StudyView):
    def visible(self, trials):
        return []


def test_study_id_is_the_studies_row_that_storage_watch_reads_back(url, database, name):
    a = optuna.create_study(study_name=f"{name}-a", storage=url)
    b = optuna.create_study(study_name=f"{name}-b", storage=url)
    with sqlite3.connect(database) as db:
        rows = dict(db.execute("SELECT study_name, study_id FROM studies"))
    assert optuna_private.study_id(a) == rows[f"{name}-a"] != optuna_private.study_id(b) == rows[f"{name}-b"]


def test_trial_id_is_the_trials_id_in_the_storage_not_its_number(url, name):
    storage = RDBStorage(url)
    a = optuna.create_study(study_name=f"{name}-a", storage=storage)
    b = optuna.create_study(study_name=f"{name}-b", storage=storage)
    ta, tb = _ask(a), _ask(b, 0.5)
    assert ta.number == tb.number == 0 and optuna_private.trial_id(ta) != optuna_private.trial_id(tb)
    (frozen,) = b.get_trials()
    found = storage.get_trial_id_from_study_id_trial_number(optuna_private.study_id(b), 0)
    assert optuna_private.trial_id(frozen) == optuna_private.trial_id(tb) == found  # a FrozenTrial's too


def test_trial_by_id_writes_to_that_trial_from_another_study_object(url, name):
    study = optuna.create_study(study_name=name, storage=url)
    _ask(study)
    second = _ask(study)
    other = optuna.load_study(study_name=name, storage=url)  # as a rank or a later loop has it
    trial = optuna_private.trial_by_id(other, optuna_private.trial_id(second))
    trial.set_user_attr("fail_reason", "the disk is full")
    trial.report(0.25, step=3)
    assert trial.number == 1
    assert study.trials[1].user_attrs == {"fail_reason": "the disk is full"} and study.trials[0].user_attrs == {}
    assert study.trials[1].intermediate_values == {3: 0.25}


def test_backend_is_the_storage_under_optunas_cache(url):
    rdb = RDBStorage(url)
    assert optuna_private.backend(optuna.create_study(storage=rdb)) is rdb  # whose engine a fork must not share
    assert isinstance(optuna_private.backend(optuna.create_study()), InMemoryStorage)


def test_stored_trials_are_the_storages_now_whatever_the_study_object_shows(url, name):
    study = optuna.create_study(study_name=name, storage=url)
    _ask(study)
    _ask(study)
    optuna.load_study(study_name=name, storage=url).tell(1, 0.5)  # another worker's
    hidden = _Hidden(study)
    assert hidden.get_trials() == [] and hidden.trials == []
    for s in (study, hidden):
        assert [(t.number, t.state) for t in optuna_private.stored_trials(s)] == [
            (0, TrialState.RUNNING),
            (1, TrialState.COMPLETE),
        ]


def test_system_attrs_of_a_running_trial_are_read_and_written_in_the_storage(url, name):
    study = optuna.create_study(study_name=name, storage=url)
    study.enqueue_trial({"x": 0.25})
    trial = _ask(study)
    assert trial.params == {"x": 0.25}
    assert optuna_private.system_attrs(trial)[FIXED_PARAMS] == {"x": 0.25}  # a queued trial's parameters
    assert FIXED_PARAMS not in optuna_private.system_attrs(_ask(study))  # a sampled one has none
    optuna_private.set_system_attr(trial, "hpo:sampled", True)
    assert study.trials[0].system_attrs["hpo:sampled"] is True
    assert optuna_private.system_attrs(trial)["hpo:sampled"] is True


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # since Optuna 2.8; hpo relies on it
def test_retry_history_is_what_the_stale_trial_retry_leaves_on_the_retry(url, name):
    study = optuna.create_study(study_name=name, storage=url)
    _ask(study)
    study.tell(0, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback(max_retry=2)(study, study.trials[0])  # what a stale heartbeat calls
    retry = _ask(study)
    assert optuna_private.system_attrs(retry)[RETRY_HISTORY] == [0]
    assert RetryHeartbeatStaleTrialCallback.retry_history(study.trials[1]) == [0]  # Optuna's own reading of it


def test_stored_user_attrs_and_intermediate_values_see_another_process_write(url, name):
    study = optuna.create_study(study_name=name, storage=url)
    trial = _ask(study)
    trial.report(0.5, step=1)
    rank = optuna_private.trial_by_id(optuna.load_study(study_name=name, storage=url), optuna_private.trial_id(trial))
    rank.set_user_attr("micro_batch", 4)
    rank.report(0.25, step=2)
    assert optuna_private.stored_user_attrs(trial) == {"micro_batch": 4}
    assert optuna_private.intermediate_values(trial) == {1: 0.5, 2: 0.25}


@pytest.mark.parametrize(
    "sampler", [optuna.samplers.TPESampler, optuna.samplers.GPSampler, optuna.samplers.CmaEsSampler]
)
def test_startup_trials_is_the_samplers_random_start(sampler):
    assert optuna_private.startup_trials(sampler(n_startup_trials=7)) == 7
    assert optuna_private.startup_trials(optuna.samplers.RandomSampler()) == 0  # none: every draw is random


def test_startup_trials_are_the_trials_tpe_draws_before_it_models():
    # hpo replays the start-up of a seeded sampler: its first n_startup_trials draws are its random sampler's.
    tpe = optuna.samplers.TPESampler(n_startup_trials=3, seed=7)
    study = optuna.create_study(sampler=tpe)
    drawn = [_ask(study, 0.5).params["x"] for _ in range(optuna_private.startup_trials(tpe))]
    random = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
    assert drawn == [_ask(random, 0.5).params["x"] for _ in range(3)]


def test_contains_is_optunas_membership_test():
    assert optuna_private.contains(X, 0.5) and not optuna_private.contains(X, 1.5)
    assert not optuna_private.contains(X, "a")  # another kind of value: not in it, no error
    steps = IntDistribution(1, 9, step=2)
    assert optuna_private.contains(steps, 3) and not optuna_private.contains(steps, 4)
    choices = CategoricalDistribution(["a", 2])
    assert optuna_private.contains(choices, "a") and optuna_private.contains(choices, 2)
    assert not optuna_private.contains(choices, "b")
    study = optuna.create_study()
    study.enqueue_trial({"x": 1.5})
    with pytest.warns(UserWarning, match="out of range"):  # the test Optuna itself makes of a queued value
        _ask(study)


def test_hyperband_brackets_decide_as_hyperband_itself():
    # Two twin studies (one name: Hyperband's brackets hash it), the same made-up curves: one pruned by Hyperband,
    # the other as hpo's ordered pruner asks it, the trial's bracket pruner over a view of that bracket.
    def study(hyperband):
        return optuna.create_study(study_name="twin", pruner=hyperband, sampler=optuna.samplers.RandomSampler(seed=0))

    own = study(optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3))
    hyperband = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3)
    ours = study(hyperband)

    class Bracket(StudyView):
        def __init__(self, study, bracket):
            super().__init__(study)
            self.bracket = bracket

        def visible(self, trials):
            return [t for t in trials if optuna_private.bracket_of(hyperband, self._study, t) == self.bracket]

    brackets, pruned = set(), 0
    for n in range(30):
        a, b = own.ask(), ours.ask()
        for step in range(1, 10):
            value = (n * 7 % 11) / (step + 1)  # some curves worse than others
            a.report(value, step)
            b.report(value, step)
            bracket, pruner = optuna_private.bracket_pruner(hyperband, ours, ours.trials[n])
            assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
            decision = pruner.prune(Bracket(ours, bracket), ours.trials[n])
            assert decision == own.pruner.prune(own, own.trials[n]), f"trial {n} at step {step}"
            brackets.add(bracket)
            if decision:
                break
        for s, t in ((own, a), (ours, b)):
            s.tell(t, state=TrialState.PRUNED) if decision else s.tell(t, 0.5)
        pruned += decision
    assert len(brackets) > 1 and 0 < pruned < 30  # several brackets, some trials pruned: the test can fail


def test_optunas_samplers_read_a_study_through_the_view():
    # hpo's ordered sampling shows each trial a past of its own: only if the samplers read trials through the view.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for value in (0.1, 0.2, 0.3, 0.4, 0.5):
        _ask(study, value)
    calls = []

    class Spy(StudyView):
        def _get_trials(self, deepcopy=True, states=None, use_cache=False):
            calls.append(use_cache)
            return super()._get_trials(deepcopy, states, use_cache)

    trial = study.ask()
    frozen = study.trials[trial.number]
    for sampler in (
        optuna.samplers.TPESampler(n_startup_trials=2, seed=0),
        optuna.samplers.TPESampler(n_startup_trials=2, seed=0, multivariate=True, constant_liar=True),  # hpo's
    ):
        calls.clear()
        view = Spy(study)
        sampler.sample_relative(view, frozen, sampler.infer_relative_search_space(view, frozen))
        sampler.sample_independent(view, frozen, "x", X)
        assert True in calls, "the sampler read the study's trials past the view"
