"""One trial in process: study assets, determinism, evaluation batching, recorded figures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from kdsearch.service.loading import load_spec
from kdsearch.service.record import ProbePoint
from kdsearch.service.spec import StudentSpec, StudySpec, TrainingSpec
from kdsearch.workers.assets import StudyAssets, prepare_assets
from kdsearch.workers.cache import AssetCache
from kdsearch.workers.device import bf16_hardware, dtype_of, resolve_precision
from kdsearch.workers.inference import predict_logits, probabilities
from kdsearch.workers.models import Loading, forget_loaded, fresh_student, shared_teacher
from tests.helpers import make_trial, tiny_spec_text, write_spec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> StudySpec:
    fixtures = Path(__file__).parent / "fixtures" / "glue" / "SST-2"
    folder = tmp_path_factory.mktemp("trial")
    return load_spec(write_spec(folder / "t.yaml", tiny_spec_text("t", tiny_bert_dir, fixtures)))


@pytest.fixture(scope="module")
def assets(spec: StudySpec, tmp_path_factory: pytest.TempPathFactory) -> StudyAssets:
    return prepare_assets(spec, AssetCache(tmp_path_factory.mktemp("cache")), CPU)


def test_assets_are_computed_once_and_reused(
    spec: StudySpec, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kdsearch.workers")
    first = prepare_assets(spec, AssetCache(tmp_path), CPU)
    second = prepare_assets(spec, AssetCache(tmp_path), CPU)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("preparing study assets" in m for m in messages) == 1
    assert sum("reusing study assets" in m for m in messages) == 1
    torch.testing.assert_close(first.teacher_logits_train, second.teacher_logits_train)
    assert first.teacher_logits_train.shape == (160, 2)
    assert first.teacher_logits_dev.shape == (64, 2)
    # the fine-tuned teacher is kept with the assets
    assert (first.folder / "teacher" / "config.json").is_file()
    # a changed spec (here: max_seq_length) gets new assets, never stale ones
    other = prepare_assets(
        spec.model_copy(update={"max_seq_length": 16}), AssetCache(tmp_path), CPU
    )
    assert other.folder != first.folder


def test_teacher_fine_tuning_learns_the_task(assets: StudyAssets) -> None:
    # 160 real SST-2 rows, tiny random BERT: fine-tuning must beat the majority class.
    majority = max(np.mean(assets.labels_train), 1 - np.mean(assets.labels_train))
    assert assets.teacher_train_accuracy > majority + 0.05


def test_same_trial_same_numbers(spec: StudySpec, assets: StudyAssets) -> None:
    params = {"learning_rate": 2e-3, "batch_size": 16, "epochs": 2}
    first = make_trial(spec, assets, params, CPU).run()
    second = make_trial(spec, assets, params, CPU).run()
    assert first.sigma == second.sigma
    assert first.accuracy_drop == second.accuracy_drop
    np.testing.assert_array_equal(first.student_probs_train, second.student_probs_train)
    assert first.outcome.epoch_losses == second.outcome.epoch_losses
    assert len(first.outcome.epoch_losses) == 2
    # a different learning rate gives a different student
    other = make_trial(spec, assets, {**params, "learning_rate": 1e-4}, CPU).run()
    assert other.sigma != first.sigma


def test_recorded_figures_are_consistent(spec: StudySpec, assets: StudyAssets) -> None:
    params = {"learning_rate": 2e-3, "batch_size": 16, "epochs": 1}
    o = make_trial(spec, assets, params, CPU).run().outcome
    assert o.sigma == o.train_sigma
    assert o.accuracy_drop == pytest.approx(o.teacher_dev_accuracy - o.student_dev_accuracy)
    assert o.train_n_total == 160 and 0 < o.train_n_kept <= 160
    assert o.dev_n_total == 64
    assert o.train_mean_abs_delta <= o.train_rms_delta
    for ece in (o.teacher_train_ece, o.student_train_ece, o.teacher_dev_ece, o.student_dev_ece):
        assert 0 <= ece <= 1
    assert o.wall_time_s > 0
    assert o.teacher_dev_f1 is None and o.teacher_dev_mcc is None  # SST-2: accuracy only
    assert set(o.attrs()) <= o.KEYS and "teacher_dev_f1" not in o.attrs()


def test_evaluation_does_not_depend_on_batch_size(assets: StudyAssets, spec: StudySpec) -> None:
    teacher = shared_teacher(assets.teacher, assets.num_labels).eval()
    dev = assets.teacher_inputs.dev
    one = predict_logits(teacher, dev, CPU, 1)
    many = predict_logits(teacher, dev, CPU, 64)
    torch.testing.assert_close(one, many, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(many, assets.teacher_logits_dev, rtol=1e-4, atol=1e-5)


def test_best_dev_selection_scores_the_best_evaluation(
    spec: StudySpec, assets: StudyAssets
) -> None:
    selecting = spec.model_copy(
        update={"training": TrainingSpec(selection="best_dev", eval_every_steps=3)}
    )
    points: list[ProbePoint] = []
    params = {"learning_rate": 5e-3, "batch_size": 16, "epochs": 2}
    result = make_trial(selecting, assets, params, CPU, on_probe=points.append).run()
    # 10 steps per epoch: evaluations at steps 3, 6, 9, 10 (epoch end), 12, 15, 18, 20
    assert [p.epoch for p in points] == pytest.approx([0.3, 0.6, 0.9, 1.0, 1.2, 1.5, 1.8, 2.0])
    o = result.outcome
    best = min(points, key=lambda p: (p.accuracy_drop, p.epoch))  # the first of the best
    assert o.selected_epoch == pytest.approx(best.epoch)
    assert o.student_dev_accuracy == pytest.approx(o.teacher_dev_accuracy - best.accuracy_drop)
    # the scored student is that one: its train figures are recomputed for it
    last = make_trial(spec, assets, params, CPU).run().outcome
    assert last.selected_epoch is None
    assert (o.selected_epoch == 2.0) == (o.student_train_accuracy == last.student_train_accuracy)


def test_bertadam_trains_the_student(spec: StudySpec, assets: StudyAssets) -> None:
    paper = spec.model_copy(update={"training": TrainingSpec(optimizer="bertadam")})
    params = {"learning_rate": 2e-3, "batch_size": 16, "epochs": 2}
    bert = make_trial(paper, assets, params, CPU).run().outcome
    adamw = make_trial(spec, assets, params, CPU).run().outcome
    assert bert.epoch_losses[1] < bert.epoch_losses[0]
    assert bert.sigma != adamw.sigma  # another optimizer, another student


def test_student_weights_are_drawn_from_the_seed_on_every_load(tmp_path: Path) -> None:
    # The checkpoint is read once per process; every later load copies it and draws the
    # new classifier head again: the same seed gives the same student, first load or not.
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    BertModel(config).save_pretrained(tmp_path)  # an encoder without a classifier head
    student = str(tmp_path)
    forget_loaded()
    first, again, other = (fresh_student(student, 2, seed) for seed in (7, 7, 8))
    forget_loaded()
    cold = fresh_student(student, 2, 7)  # read from disk
    heads = [m.classifier.weight for m in (first, again, other, cold)]
    assert torch.equal(heads[0], heads[1]) and torch.equal(heads[0], heads[3])
    assert not torch.equal(heads[0], heads[2])
    for name, p in first.bert.named_parameters():  # the checkpoint's weights, untouched
        torch.testing.assert_close(p, other.bert.get_parameter(name), rtol=0, atol=0)
    # a copy each time: training one student leaves the next one untouched
    with torch.no_grad():
        first.classifier.weight.add_(1.0)
    assert torch.equal(fresh_student(student, 2, 7).classifier.weight, heads[1])


def test_auto_precision_follows_the_cpu_flags(caplog: pytest.LogCaptureFixture) -> None:
    flags = (
        set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    )
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    assert (bf16_hardware(CPU) is not None) == native
    caplog.set_level(logging.INFO, logger="kdsearch.workers.device")
    assert dtype_of(resolve_precision("auto", CPU)) == (torch.bfloat16 if native else None)
    assert resolve_precision("fp32", CPU) == "fp32" and dtype_of("fp32") is None
    assert resolve_precision("bf16", CPU) == "bf16" and dtype_of("bf16") == torch.bfloat16
    assert f"bf16 hardware: {bf16_hardware(CPU) or 'none'}" in caplog.records[0].getMessage()


def test_bf16_training_agrees_with_fp32(spec: StudySpec, assets: StudyAssets) -> None:
    # bf16 autocast trains and evaluates during training; the final scoring is fp32.
    # docs/benchmarks.md: on real models the two differ far less than one seed moves sigma.
    params = {"learning_rate": 2e-3, "batch_size": 16, "epochs": 2}
    fp32 = make_trial(spec, assets, params, CPU).run()
    bf16 = make_trial(spec, assets, params, CPU, precision="bf16").run()
    assert bf16.student_probs_train.dtype == np.float32
    assert bf16.sigma != fp32.sigma  # it did train in another precision
    assert abs(bf16.sigma - fp32.sigma) < 0.005
    assert abs(bf16.accuracy_drop - fp32.accuracy_drop) <= 2 / 64  # at most 2 dev rows


def _roberta_student_with_its_own_vocabulary(folder: Path, texts: list[str]) -> None:
    """A tiny RoBERTa-style classifier and a word-level tokenizer trained on ``texts``:
    another tokenizer class, another vocabulary, other special tokens than the teacher's."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import (
        PreTrainedTokenizerFast,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    raw = Tokenizer(WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(texts, WordLevelTrainer(special_tokens=specials))
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 1), ("</s>", 2)],
    )  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
    )  # fmt: skip
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=40, pad_token_id=0, type_vocab_size=1,
        num_labels=2,
    )  # fmt: skip
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_student_with_its_own_tokenizer(
    spec: StudySpec, assets: StudyAssets, tmp_path: Path
) -> None:
    # The teacher (BERT WordPiece, 30k tokens) and the student (RoBERTa-style, a word-level
    # vocabulary of a few hundred) each tokenise the same rows; the teacher's logits,
    # computed once on its own tokens, are the targets of the student's rows.
    from kdsearch.workers.data import load_task_data
    from kdsearch.workers.models import load_tokenizer

    student_dir = tmp_path / "student"
    texts = load_task_data(spec.data, spec.task).train.text_a
    _roberta_student_with_its_own_vocabulary(student_dir, texts)
    own = spec.model_copy(update={"student": StudentSpec(model=str(student_dir))})
    ours = prepare_assets(own, AssetCache(tmp_path / "cache"), CPU)
    teacher_rows, student_rows = ours.teacher_inputs, ours.student_inputs
    assert student_rows is not teacher_rows
    assert len(student_rows.train) == len(teacher_rows.train) == 160
    assert len(student_rows.dev) == len(teacher_rows.dev) == 64
    student_tokenizer = load_tokenizer(str(student_dir))
    first = student_rows.train.input_ids[0]
    assert (
        first[0] == student_tokenizer.bos_token_id and first[-1] == student_tokenizer.eos_token_id
    )
    assert max(max(ids) for ids in student_rows.train.input_ids) < len(student_tokenizer)
    assert student_tokenizer.decode(first[1:-1]).split()[:3] == texts[0].split()[:3]
    assert teacher_rows.train.input_ids[0] != first  # another vocabulary
    # the teacher's side is the study's shared one, computed once, untouched
    torch.testing.assert_close(ours.teacher_logits_train, assets.teacher_logits_train)
    # Trained on the teacher's logits row by row, the student's probabilities move toward
    # the teacher's (rows misaligned between the two tokenisations would not).
    untrained = fresh_student(str(student_dir), 2, own.seed, Loading(labels=ours.label_names))
    before = probabilities(predict_logits(untrained, student_rows.train, CPU, 64))
    params = {"learning_rate": 3e-3, "batch_size": 16, "epochs": 10}  # 200 tiny steps
    result = make_trial(own, ours, params, CPU).run()
    teacher = probabilities(ours.teacher_logits_train)
    gap = [np.abs(teacher - p).mean() for p in (before, result.student_probs_train)]
    assert gap[1] < 0.5 * gap[0], gap
    o = result.outcome
    assert o.teacher_dev_accuracy == assets.teacher_dev_accuracy
    assert 0 < o.train_n_kept <= 160 and np.isfinite(o.sigma)
