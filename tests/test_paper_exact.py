"""The paper's baseline, exactly: TinyBERT's ``task_distill.py`` stage-2 loop transcribed
here (a train-mode teacher, TinyBERT's head, BertAdam, its DataLoader and its evaluation
grid with best-dev selection) on tiny models and real SST-2 rows, against a kdsearch trial
in paper mode on the same models, rows and seed: the same sigma within 1e-6. And stage 1's
loss over padded tensors against TinyBERT's formula, by hand.

The transcription follows task_distill.py (upstream and the authors' fork):

    for epoch_ in range(num_train_epochs):
        for step, batch in enumerate(train_dataloader):      # RandomSampler
            if input_ids.size()[0] != args.train_batch_size: continue
            student_logits, _, _ = student_model(input_ids, segment_ids, input_mask)
            with torch.no_grad():
                teacher_logits, _, _ = teacher_model(...)      # never .eval(): dropout on
            loss = soft_cross_entropy(student_logits / T, teacher_logits / T)
            loss.backward(); optimizer.step(); optimizer.zero_grad(); global_step += 1
            if (global_step + 1) % args.eval_step == 0:
                result = do_eval(student_model, ...)           # SequentialSampler loader
                if result['acc'] > best_dev_acc: save the student
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler, TensorDataset
from transformers import BertForSequenceClassification, BertModel

from kdsearch.service.loading import load_spec
from kdsearch.workers.assets import StudyAssets, prepare_assets
from kdsearch.workers.batching import Encoded, collate, dataloader_batches
from kdsearch.workers.cache import AssetCache
from kdsearch.workers.intermediate import IntermediateLoss, LayerMap
from kdsearch.workers.stages import study_teacher
from kdsearch.workers.trial import standalone_trial
from tests.helpers import tiny_spec_text, write_spec
from tests.test_training import _reference_bertadam_step

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
PAPER_TRAINING = """\
training:
  optimizer: bertadam
  selection: best_dev
  eval_grid: tinybert
  eval_every_steps: 3
  teacher_targets: dropout
  student_head: tinybert
  batching: tinybert
  precision: fp32
eval_batch_size: 16
"""
PARAMS = {"learning_rate": 1e-2, "batch_size": 8, "epochs": 3}
TEMPERATURE, WEIGHT_DECAY, SEED = 2.0, 1e-4, 11


class TinyBertForSequenceClassification(nn.Module):
    """TinyBERT's ``transformer/modeling.py`` class: ``classifier(relu(pooled_output))``."""

    def __init__(self, config) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.bert = BertModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, input_ids, token_type_ids, attention_mask):  # type: ignore[no-untyped-def]
        pooled = self.bert(
            input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask
        ).pooler_output
        return self.classifier(torch.relu(pooled))


def padded(data: Encoded, max_len: int) -> TensorDataset:
    """TinyBERT's features: every row padded to max_seq_length."""
    batch = collate(data, list(range(len(data))), pad_to=max_len)
    types = batch.get("token_type_ids", torch.zeros_like(batch["input_ids"]))
    return TensorDataset(batch["input_ids"], types, batch["attention_mask"], data.labels)


def sigma(teacher_probs: np.ndarray, student_logits: torch.Tensor, labels: np.ndarray) -> float:
    """The paper's sigma: population std of p0_T - p0_S where both predict the label."""
    student = torch.softmax(student_logits.double(), -1).numpy()
    both = (teacher_probs.argmax(1) == labels) & (student.argmax(1) == labels)
    assert both.sum() > 10
    return float(np.std(teacher_probs[both, 0] - student[both, 0]))


@pytest.fixture(scope="module")
def paper(tmp_path_factory, tiny_bert_dir: Path):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("paper-exact")
    data = Path(__file__).parent / "fixtures" / "glue" / "SST-2"
    text = tiny_spec_text("exact", tiny_bert_dir, data, extra=PAPER_TRAINING).replace(
        "teacher_layers: 1\n", "teacher_layers: 1\n  layers_from: finetuned\n"
    )  # a student that starts from the fine-tuned teacher's first layer: it learns
    spec = load_spec(write_spec(tmp / "exact.yaml", text))
    assets = prepare_assets(spec, AssetCache(tmp / "cache"), CPU)
    return spec, assets


def transcribed_stage2(spec, assets: StudyAssets, init: dict, student_config):  # type: ignore[no-untyped-def]
    """task_distill.py's stage 2 from the same initial student. TinyBERT seeds the global
    generator once at start-up, then builds its models; kdsearch seeds it with the
    trial's seed as stage 2 starts, its models built (so every path draws the same
    masks): the loop starts from that state here."""
    student = TinyBertForSequenceClassification(student_config)
    student.load_state_dict(init)
    teacher_config = study_teacher(assets).config
    teacher = BertForSequenceClassification.from_pretrained(
        assets.teacher, attn_implementation=teacher_config._attn_implementation
    )
    teacher.train()  # task_distill.py never calls teacher_model.eval()
    batch_size, epochs = PARAMS["batch_size"], PARAMS["epochs"]
    train = padded(assets.student_inputs.train, spec.max_seq_length)
    dev = padded(assets.student_inputs.dev, spec.max_seq_length)
    train_loader = DataLoader(train, sampler=RandomSampler(train), batch_size=batch_size)
    dev_loader = DataLoader(dev, sampler=SequentialSampler(dev), batch_size=spec.eval_batch_size)
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    decay = {
        id(p): 0.0 if any(nd in n for nd in no_decay) else WEIGHT_DECAY
        for n, p in student.named_parameters()
    }
    t_total = int(len(train) / batch_size) * epochs
    state: dict = {}
    global_step, best_acc, best = 0, 0.0, None
    evaluations = []
    torch.manual_seed(SEED)
    for _ in range(epochs):
        student.train()
        for batch in train_loader:
            input_ids, segment_ids, input_mask, _ = batch
            if input_ids.size()[0] != batch_size:
                continue
            student_logits = student(input_ids, segment_ids, input_mask)
            with torch.no_grad():
                teacher_logits = teacher(
                    input_ids=input_ids, token_type_ids=segment_ids, attention_mask=input_mask
                ).logits
            target = F.softmax(teacher_logits / TEMPERATURE, dim=-1)
            loss = (-target * F.log_softmax(student_logits / TEMPERATURE, dim=-1)).mean()
            loss.backward()
            _reference_bertadam_step(
                list(student.parameters()), state, PARAMS["learning_rate"], 0.1, t_total, decay
            )
            student.zero_grad()
            global_step += 1
            if (global_step + 1) % spec.training.eval_every_steps == 0:
                student.eval()
                with torch.no_grad():
                    preds = torch.cat([student(b[0], b[1], b[2]).argmax(-1) for b in dev_loader])
                acc = float((preds == dev.tensors[3]).float().mean())
                evaluations.append((global_step, acc))
                if acc > best_acc:
                    best_acc, best = acc, copy.deepcopy(student.state_dict())
                student.train()
    if best is not None:
        student.load_state_dict(best)
    student.eval()
    with torch.no_grad():
        logits = torch.cat(
            [
                student(b[0], b[1], b[2])
                for b in DataLoader(train, sampler=SequentialSampler(train), batch_size=16)
            ]
        )
    return logits, evaluations


def test_a_paper_mode_trial_is_task_distill_py_stage_2(paper) -> None:  # type: ignore[no-untyped-def]
    spec, assets = paper
    params = {**PARAMS, "weight_decay": WEIGHT_DECAY, "temperature": TEMPERATURE}
    trial = standalone_trial(spec, assets, params, CPU, seed=SEED)
    trial.setup()
    assert trial.student is not None
    init = {k: v.detach().clone() for k, v in trial.student.state_dict().items()}
    trial.train()
    ours_train, _, selected = trial.scored_logits()
    ours = sigma(assets.teacher_probs_train, ours_train, assets.labels_train)
    theirs_train, evaluations = transcribed_stage2(spec, assets, init, trial.student.config)
    theirs = sigma(assets.teacher_probs_train, theirs_train, assets.labels_train)
    # the same evaluations (the grid: after steps 2, 5, 8, ...), the same selection
    steps = [round(e.epoch * trial.steps_per_epoch) for e in trial.evaluations]
    assert steps == [s for s, _ in evaluations] == list(range(2, 3 * trial.steps_per_epoch + 1, 3))
    assert [e.metric for e in trial.evaluations] == pytest.approx([a for _, a in evaluations])
    assert abs(ours - theirs) < 1e-6, (ours, theirs)
    assert selected is not None
    # The comparison can tell: the same trial with eval-mode (cached) targets, or with
    # kdsearch's own batching, gives another sigma.
    for change in ({"teacher_targets": "eval"}, {"batching": "length_grouped"}):
        other = spec.model_copy(update={"training": spec.training.model_copy(update=change)})
        trial = standalone_trial(other, assets, params, CPU, seed=SEED)
        train_logits, _, _ = trial_logits(trial)
        assert (
            abs(sigma(assets.teacher_probs_train, train_logits, assets.labels_train) - ours) > 1e-5
        )


def trial_logits(trial):  # type: ignore[no-untyped-def]
    trial.setup()
    trial.train()
    return trial.scored_logits()


def test_the_dataloader_emulation_draws_what_a_real_dataloader_draws() -> None:
    data = TensorDataset(torch.arange(37))
    torch.manual_seed(5)
    loader = DataLoader(data, sampler=RandomSampler(data), batch_size=8)
    real = [b[0].tolist() for _ in range(3) for b in loader]
    after_real = torch.rand(3)
    torch.manual_seed(5)
    ours = [b for _ in range(3) for b in dataloader_batches(37, 8, drop_last=False)]
    assert ours == real and torch.equal(torch.rand(3), after_real)


def test_stage_1_padded_matching_is_tinybert_s_loss_on_a_padded_batch() -> None:
    # TinyBERT's stage-1 loss, a 1-layer student of a 2-layer teacher (layers_per_block 2):
    # MSE over the whole padded tensors, attention scores at masked positions (<= -100)
    # set to 0 first, student layer 0's scores against teacher layer 1's; hidden states
    # (embeddings and layer 1) through fit_dense against teacher indices 0 and 2. Two rows,
    # one padded.
    torch.manual_seed(0)
    batch, heads, length, hidden = 2, 2, 5, 4
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    masked = (1 - mask[:, None, None, :]) * torch.finfo(torch.float32).min

    def scores() -> torch.Tensor:
        return torch.randn(batch, heads, length, length) + masked  # as BERT masks them

    s_att, t_att = (scores(),), (scores(), scores())
    s_hid = tuple(torch.randn(batch, length, hidden) for _ in range(2))
    t_hid = tuple(torch.randn(batch, length, hidden) for _ in range(3))
    loss = IntermediateLoss(LayerMap(1, 2), hidden, hidden, matching="padded")

    def zeroed(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a <= -1e2, torch.zeros_like(a), a)

    att, rep = loss(s_hid, t_hid, s_att, t_att, mask)
    fit = loss.fit_dense
    torch.testing.assert_close(att, F.mse_loss(zeroed(s_att[0]), zeroed(t_att[1])))
    expected = F.mse_loss(fit(s_hid[0]), t_hid[0]) + F.mse_loss(fit(s_hid[1]), t_hid[2])
    torch.testing.assert_close(rep, expected)
    # matching real tokens only leaves the padded positions out: another number
    tokens = IntermediateLoss(LayerMap(1, 2), hidden, hidden, matching="tokens")
    tokens.fit_dense.load_state_dict(fit.state_dict())
    att_tokens, rep_tokens = tokens(s_hid, t_hid, s_att, t_att, mask)
    assert not torch.allclose(rep_tokens, rep) and not torch.allclose(att_tokens, att)
