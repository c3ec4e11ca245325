"""The Python API as a notebook uses it: create from a dict, a worker in-process, results
as a typed DataFrame, per-input predictions that reproduce sigma."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

import kdsearch
from kdsearch.service.errors import KdsearchError, SpecError
from kdsearch.service.record import TrialOutcome
from tests.helpers import tiny_spec_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_bert_dir, postgres_server_url) -> kdsearch.Study:
    import sqlalchemy

    tmp = tmp_path_factory.mktemp("api")
    admin = sqlalchemy.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text('DROP DATABASE IF EXISTS "kdsearch_api"'))
        conn.execute(sqlalchemy.text('CREATE DATABASE "kdsearch_api"'))
    admin.dispose()
    url = sqlalchemy.engine.make_url(postgres_server_url).set(database="kdsearch_api")
    data = Path(__file__).parent / "fixtures" / "glue" / "SST-2"
    spec = yaml.safe_load(tiny_spec_text("api", tiny_bert_dir, data, n_trials=2))
    study = kdsearch.create_study(
        spec, storage=url.render_as_string(hide_password=False), artifacts=str(tmp / "art")
    )
    study.run_worker(max_trials=1, threads=1)  # stops after one trial: the baseline
    assert [r.state.name for r in study.records()] == ["COMPLETE"]
    study.run_worker(threads=1)  # the rest of the budget
    return study


def test_create_from_a_dict_then_attach_and_load(done: kdsearch.Study) -> None:
    assert repr(done) == "kdsearch.Study('api', task='sst2')"
    again = kdsearch.create_study(done.spec, storage=done.storage_url)  # attach: same spec
    assert again.name == "api" and len(again.records()) == 2
    assert kdsearch.load_study("api", storage=done.storage_url).spec == done.spec
    with pytest.raises(KdsearchError, match="study 'nope' does not exist"):
        kdsearch.load_study("nope", storage=done.storage_url)
    with pytest.raises(SpecError, match="n_trials: got 0"):
        kdsearch.create_study({**done.spec.to_json_dict(), "n_trials": 0}, done.storage_url)


def test_trials_dataframe_is_typed_and_matches_the_trials(done: kdsearch.Study) -> None:
    df = done.trials_dataframe()
    assert list(df["trial"]) == [0, 1] and list(df["state"]) == ["COMPLETE"] * 2
    assert bool(df["baseline"][0]) and not bool(df["baseline"][1])
    dtypes = {c: str(t) for c, t in df.dtypes.items()}
    assert dtypes["trial"] == "int64" and dtypes["batch_size"] == "Int64"
    assert dtypes["learning_rate"] == "float64"
    assert dtypes["sigma"] == "float64" and dtypes["train_n_kept"] == "Int64"
    assert dtypes["feasible"] == "boolean" and dtypes["epoch_losses"] == "object"
    assert set(TrialOutcome.KEYS) <= set(df.columns)
    for row, trial in zip(df.itertuples(), done.optuna.trials, strict=True):
        assert (row.sigma, row.accuracy_drop) == tuple(trial.values)
        assert row.learning_rate == trial.params["learning_rate"]
    assert df["teacher_dev_f1"].isna().all()  # SST-2: no F1


def test_predictions_reproduce_the_trials_sigma(done: kdsearch.Study) -> None:
    trial = done.optuna.trials[1]
    train = done.predictions(trial=1)
    assert len(train) == 160 and {"label", "teacher_p0", "student_p1", "delta"} <= set(train)
    kept = train["delta"].dropna()
    assert len(kept) == trial.user_attrs["train_n_kept"] == int(train["both_correct"].sum())
    assert float(np.std(kept)) == pytest.approx(trial.values[0], abs=1e-12)
    dev = done.predictions(trial=1, split="dev")
    assert len(dev) == 64
    with pytest.raises(KdsearchError, match="use 'train' or 'dev'"):
        done.predictions(trial=1, split="test")
    with pytest.raises(KdsearchError, match="trial 7 of 'api' has no prediction files"):
        done.predictions(trial=7)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda url: kdsearch.create_study(123, storage=url), "a study spec must be a YAML path"),
        (
            lambda url: kdsearch.create_study({"name": "x"}, storage=7),
            "storage must be a non-empty",
        ),
        (lambda url: kdsearch.load_study(None, storage=url), "name must be a non-empty text"),
        (lambda url: kdsearch.load_study("api", storage=""), "storage must be a non-empty"),
        (lambda url: kdsearch.load_study(["api"], storage=url), "name must be a non-empty text"),
    ],
)
def test_wrong_types_get_one_clear_message(done: kdsearch.Study, call, words: str) -> None:
    with pytest.raises(KdsearchError, match=words):
        call(done.storage_url)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_trials": 0}, "max_trials"),
        ({"max_trials": -1}, "max_trials"),
        ({"threads": 0}, "threads"),
        ({"precision": "fp8"}, "precision"),
        ({"max_trials": True}, "max_trials"),
        ({"max_trials": 1.5}, "max_trials"),
        ({"gpus": 2}, "gpus"),
    ],
)
def test_bad_worker_options_are_refused_before_anything_runs(
    done: kdsearch.Study, options: dict, words: str
) -> None:
    before = [(r.number, r.state) for r in done.records()]
    with pytest.raises(KdsearchError, match=words):
        done.run_worker(**options)
    assert [(r.number, r.state) for r in done.records()] == before


def test_a_handle_to_a_deleted_study_says_so(done: kdsearch.Study, tmp_path: Path) -> None:
    from kdsearch.service.storage import open_storage
    from kdsearch.service.study import delete_study

    data = Path(__file__).parent / "fixtures" / "glue" / "SST-2"
    spec = yaml.safe_load(tiny_spec_text("gone", Path(done.spec.teacher.model), data))
    gone = kdsearch.create_study(spec, storage=done.storage_url, artifacts=str(tmp_path / "a"))
    delete_study(open_storage(done.storage_url), "gone")
    for use in (gone.records, gone.summary, gone.run_worker):
        with pytest.raises(KdsearchError, match=r"no longer exists .*deleted"):
            use()
