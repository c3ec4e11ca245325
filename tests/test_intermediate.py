"""TinyBERT stage 1: layer mapping, the loss against hand-computed values, and a run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from kdsearch.service.errors import SpecError
from kdsearch.service.spec import Stage1Spec, load_spec
from kdsearch.service.study import trial_hyperparameters, trial_stage1
from kdsearch.workers.assets import AssetCache, prepare_assets, prepare_stage1_student
from kdsearch.workers.intermediate import IntermediateLoss, LayerMap
from kdsearch.workers.trial import DistillationTrial

from tests.conftest import tiny_spec_text, write_spec

CPU = torch.device("cpu")
SEARCH_STAGE1_LR = (
    "search_space:\n  stage1_learning_rate: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}\n"
)


def test_layer_map_matches_tinybert() -> None:
    # BERT-base (12) -> TinyBERT 4L: hidden i -> 3i, attention i -> i*3 + 3 - 1
    m = LayerMap(student_layers=4, teacher_layers=12)
    assert m.hidden() == [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)]
    assert m.attention() == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert LayerMap(6, 12).attention()[-1] == (5, 11)
    with pytest.raises(ValueError, match="multiple of the student's 5"):
        LayerMap(5, 12)


def test_intermediate_loss_hand_computed() -> None:
    loss = IntermediateLoss(LayerMap(1, 2), student_hidden=2, teacher_hidden=2)
    with torch.no_grad():  # identity projection
        loss.fit_dense.weight.copy_(torch.eye(2))
        loss.fit_dense.bias.zero_()
    mask = torch.tensor([[1, 1, 0]])  # (B=1, T=3): the last token is padding
    zeros = torch.zeros(1, 3, 2)
    s_hidden = (zeros, torch.ones(1, 3, 2))
    t_hidden = (zeros, torch.full((1, 3, 2), 5.0), torch.full((1, 3, 2), 3.0))
    # hidden: layer 0 vs 0 -> 0; student 1 vs teacher 2 -> (1 - 3)^2 = 4 on real tokens
    s_attn = (torch.full((1, 1, 3, 3), 0.5),)
    t_attn = (torch.zeros(1, 1, 3, 3), torch.full((1, 1, 3, 3), 0.25))
    # attention: student 0 vs teacher 1 -> (0.5 - 0.25)^2 = 0.0625 on the 2x2 real pairs
    att, rep = loss(s_hidden, t_hidden, s_attn, t_attn, mask)
    assert rep.item() == pytest.approx(4.0)
    assert att.item() == pytest.approx(0.0625)


@pytest.fixture()
def stage1_spec_text(tiny_bert_dir: Path, fixture_glue: Path) -> str:
    text = tiny_spec_text("st1", tiny_bert_dir, fixture_glue / "SST-2")
    return text.replace(
        "max_seq_length: 32", "max_seq_length: 32\nstage1: {epochs: 2, learning_rate: 1.0e-3}"
    )


def test_stage1_keys_need_a_stage1_section(
    tmp_path: Path, tiny_bert_dir: Path, fixture_glue: Path
) -> None:
    text = tiny_spec_text("st1", tiny_bert_dir, fixture_glue / "SST-2").replace(
        "search_space:\n",
        SEARCH_STAGE1_LR,
    )
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path / "s.yaml", text))
    (problem,) = info.value.problems
    assert problem == (
        "search_space.stage1_learning_rate: stage-1 hyperparameters need a stage1: section; "
        "add stage1: {}"
    )


def test_stage1_once_per_study(tmp_path: Path, stage1_spec_text: str, caplog) -> None:
    spec = load_spec(write_spec(tmp_path / "s.yaml", stage1_spec_text))
    assert spec.stage1 == Stage1Spec(epochs=2, learning_rate=1e-3) and not spec.stage1_per_trial
    caplog.set_level(logging.INFO)
    assets = prepare_assets(spec, AssetCache(tmp_path / "cache"), CPU)
    first = prepare_stage1_student(spec, assets, AssetCache(tmp_path / "cache"), CPU)
    again = prepare_stage1_student(spec, assets, AssetCache(tmp_path / "cache"), CPU)
    assert first == again and (first / "config.json").is_file()
    losses = [r.getMessage() for r in caplog.records if "stage 1, epoch" in r.getMessage()]
    assert len(losses) == 2  # computed once: 2 epochs, not 4
    loss_values = [float(m.rsplit(" ", 1)[1]) for m in losses]
    assert loss_values[1] < loss_values[0]  # it learns
    hparams = trial_hyperparameters(spec, {"learning_rate": 2e-3, "batch_size": 16, "epochs": 1})
    result = DistillationTrial(spec, assets, hparams, CPU, stage1_student=first).run()
    assert 0 <= result.sigma < 1


def test_stage1_searched_runs_in_every_trial(tmp_path: Path, stage1_spec_text: str) -> None:
    text = stage1_spec_text.replace(
        "search_space:\n",
        SEARCH_STAGE1_LR,
    )
    spec = load_spec(write_spec(tmp_path / "s.yaml", text))
    assert spec.stage1_per_trial
    params = {"learning_rate": 2e-3, "batch_size": 16, "epochs": 1, "stage1_learning_rate": 5e-4}
    stage1 = trial_stage1(spec, params)
    assert stage1 == Stage1Spec(epochs=2, learning_rate=5e-4)
    assets = prepare_assets(spec, AssetCache(tmp_path / "cache"), CPU)
    hparams = trial_hyperparameters(spec, params)
    result = DistillationTrial(spec, assets, hparams, CPU, stage1=stage1).run()
    assert len(result.attrs["stage1_epoch_losses"]) == 2
    assert 0 <= result.sigma < 1
