"""TinyBERT stage 1: layer mapping, the loss against hand-computed values, and a run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kdsearch.service.errors import SpecError
from kdsearch.service.loading import load_spec
from kdsearch.service.spec import Stage1Spec
from kdsearch.service.trial_config import trial_stage1
from kdsearch.workers.assets import prepare_assets
from kdsearch.workers.cache import AssetCache
from kdsearch.workers.intermediate import (
    SCORES_ATTENTION,
    IntermediateLoss,
    LayerMap,
    trained_fit_dense,
)
from kdsearch.workers.models import Loading, load_model
from tests.helpers import make_trial, tiny_spec_text, write_spec

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


MASKED = torch.finfo(torch.float32).min  # what transformers adds on masked keys


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
    s_scores = torch.full((1, 1, 3, 3), 0.5)
    t_scores = torch.full((1, 1, 3, 3), 0.25)
    s_scores[..., 2] = t_scores[..., 2] = MASKED  # raw scores carry the mask on key 2
    # attention: student 0 vs teacher 1; masked entries (<= -100) become 0 on both sides,
    # as in TinyBERT. Real query rows 0-1 x keys 0-1: (0.5 - 0.25)^2 = 0.0625 each; the
    # masked key adds 0. Mean over 2 real queries x 1 head x 3 keys: 4 * 0.0625 / 6.
    att, rep = loss(s_hidden, t_hidden, (s_scores,), (torch.zeros(1, 1, 3, 3), t_scores), mask)
    assert rep.item() == pytest.approx(4.0)
    assert att.item() == pytest.approx(0.25 / 6)
    assert att.item() == pytest.approx(0.041667, abs=1e-6)


def test_scores_attention_returns_raw_scores_without_dropout(tiny_bert_dir: Path) -> None:
    eager, _ = load_model(str(tiny_bert_dir), "t", 2, Loading(attention="eager"))
    scores, _ = load_model(str(tiny_bert_dir), "t", 2, Loading(attention=SCORES_ATTENTION))
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 102, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}  # fmt: skip
    with torch.no_grad():
        probs = eager.eval()(**batch, output_attentions=True).attentions[0]
        out = scores.eval()(**batch, output_attentions=True, output_hidden_states=True)
        raw = out.attentions[0]  # (1, heads, 5, 5)
    assert raw[..., 4].max() <= -1e30  # the padded key keeps the additive mask
    torch.testing.assert_close(torch.softmax(raw, -1), probs)  # scores, not probabilities
    torch.testing.assert_close(out.logits, eager(**batch).logits)  # same outputs otherwise
    # In training mode (dropout on) the compared maps are the same on every pass: the
    # scores are taken before dropout, unlike transformers' returned probabilities.
    scores.train()
    for name, module in scores.named_modules():
        if isinstance(module, torch.nn.Dropout):  # attention dropout only: 0.5
            module.p = 0.5 if name.endswith("attention.self.dropout") else 0.0
    with torch.no_grad():
        a = scores(**batch, output_attentions=True).attentions[0]
        b = scores(**batch, output_attentions=True).attentions[0]
    torch.testing.assert_close(a, b)


def test_trained_fit_dense_is_read_from_the_checkpoint(tmp_path: Path, tiny_bert_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    assert trained_fit_dense(str(tiny_bert_dir)) is None
    folder = tmp_path / "with-fit-dense"
    folder.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "tokenizer.json"):
        if (tiny_bert_dir / name).exists():
            (folder / name).write_bytes((tiny_bert_dir / name).read_bytes())
    state = load_file(tiny_bert_dir / "model.safetensors")
    weight, bias = torch.randn(48, 32), torch.randn(48)
    save_file({**state, "fit_dense.weight": weight, "fit_dense.bias": bias},
              folder / "model.safetensors")  # fmt: skip
    found = trained_fit_dense(str(folder))
    assert found is not None
    torch.testing.assert_close(found["weight"], weight)
    torch.testing.assert_close(found["bias"], bias)


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
    again = prepare_assets(spec, AssetCache(tmp_path / "cache"), CPU)
    first = assets.stage1_student
    assert first is not None and first == again.stage1_student
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    losses = [r.getMessage() for r in caplog.records if "stage 1, epoch" in r.getMessage()]
    assert len(losses) == 2  # computed once: 2 epochs, not 4
    loss_values = [float(m.rsplit(" ", 1)[1]) for m in losses]
    assert loss_values[1] < loss_values[0]  # it learns
    params = {"learning_rate": 2e-3, "batch_size": 16, "epochs": 1}
    result = make_trial(spec, assets, params, CPU).run()
    assert 0 <= result.sigma < 1
    # the same trial from the shared stage-1 student gives the same numbers again
    assert make_trial(spec, assets, params, CPU).run().sigma == result.sigma


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
    assert assets.stage1_student is None  # stage 1 runs in each trial instead
    result = make_trial(spec, assets, params, CPU).run()
    assert result.outcome.stage1_epoch_losses is not None
    assert len(result.outcome.stage1_epoch_losses) == 2
    assert 0 <= result.sigma < 1


REPRODUCE = """
import sys
from pathlib import Path

import torch

from kdsearch.service.loading import load_spec
from kdsearch.workers.assets import prepare_assets
from kdsearch.workers.cache import AssetCache
from tests.helpers import make_trial

torch.set_num_threads(1)
spec = load_spec(sys.argv[1])
assets = prepare_assets(spec, AssetCache(Path(sys.argv[2])), torch.device("cpu"))
params = {"learning_rate": 2e-3, "batch_size": 16, "epochs": 1}
print(repr(make_trial(spec, assets, params, torch.device("cpu")).run().sigma))
"""


def test_a_trial_from_the_shared_stage1_student_is_the_same_in_every_process(
    tmp_path: Path, stage1_spec_text: str
) -> None:
    import subprocess
    import sys

    spec_file = write_spec(tmp_path / "s.yaml", stage1_spec_text)
    command = [sys.executable, "-c", REPRODUCE, str(spec_file), str(tmp_path / "cache")]
    # The first builds the stage-1 student, the second reuses it.
    runs = [subprocess.run(command, capture_output=True, text=True, timeout=300) for _ in (1, 2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (float(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first == second and 0 < first < 1


def test_export_reproduces_a_trial_from_the_shared_stage1_student(
    tmp_path: Path, stage1_spec_text: str
) -> None:
    import json

    import kdsearch
    from kdsearch.workers.export import ExportRequest, export_student

    text = stage1_spec_text.replace("n_trials: 3", "n_trials: 1")
    storage = f"sqlite:///{tmp_path / 'k.db'}"
    study = kdsearch.create_study(
        load_spec(write_spec(tmp_path / "s.yaml", text)), storage, str(tmp_path / "art")
    )
    study.run_worker(threads=1)
    card = export_student(ExportRequest(storage, "st1", tmp_path / "out", trial=0, device="cpu"))
    assert card["reproduced_within_tolerance"] is True, card
    assert card["reproduced"]["sigma"] == card["recorded"]["sigma"]
    assert json.loads((tmp_path / "out" / "kdsearch_card.json").read_text())["trial"] == 0
