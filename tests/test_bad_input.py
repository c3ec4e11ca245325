"""Every bad input, as a row: the CLI (a real process) answers with one ``kdsearch: error:``
line naming the value, the rule and the fix, the documented exit code, no traceback, and
nothing written to the study storage.

Add a row for every input that ever got a traceback or wrote something it should not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from kdsearch.service.loading import load_spec
from kdsearch.service.record import StudyAttr
from kdsearch.service.storage import open_storage
from kdsearch.service.study import create_or_attach
from tests.helpers import FIXTURES, assert_clean_failure, kdsearch, tiny_spec_text, write_spec


@dataclass
class Workspace:
    tmp: Path
    model: Path  # a copy of the tiny BERT, free to break
    data: Path  # a copy of the SST-2 fixture rows, free to break
    storage: str

    def spec_text(self, name: str = "bad") -> str:
        return tiny_spec_text(name, self.model, self.data)

    def spec(self, edit: Callable[[str], str] = lambda t: t) -> str:
        return str(write_spec(self.tmp / "spec.yaml", edit(self.spec_text())))

    def raw_spec(self, content: bytes) -> str:
        path = self.tmp / "spec.yaml"
        path.write_bytes(content)
        return str(path)

    def data_file(self, split: str, content: bytes) -> str:
        (self.data / f"{split}.tsv").write_bytes(content)
        return self.spec()

    def model_file(self, name: str, content: bytes | None) -> str:
        path = self.model / name
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
        return self.spec()


@dataclass
class Case:
    id: str
    args: Callable[[Workspace], list[str]]
    words: list[str]
    code: int = 2
    env: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.id


def create(edit: Callable[[Workspace], str]) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["study", "create", edit(ws), "--storage", ws.storage]


def yaml_edit(old: str, new: str) -> Callable[[Workspace], str]:
    def edit(ws: Workspace) -> str:
        def apply(text: str) -> str:
            assert old in text, old
            return text.replace(old, new)

        return ws.spec(apply)

    return edit


def jsonl_spec(ws: Workspace, train: bytes) -> str:
    """The spec on JSON Lines files (a ``classification`` task) with these train rows."""
    dev = b'{"text": "a dull film", "label": 0}\n{"text": "a fine film", "label": 1}\n'
    (ws.tmp / "train.jsonl").write_bytes(train)
    (ws.tmp / "dev.jsonl").write_bytes(dev)

    def edit(text: str) -> str:
        start, end = text.index("data:"), text.index("teacher:")
        data = (
            f"data:\n  source: files\n  train: {ws.tmp / 'train.jsonl'}\n"
            f"  dev: {ws.tmp / 'dev.jsonl'}\n  columns: {{text: text, label: label}}\n"
        )
        return text[:start].replace("task: sst2", "task: classification") + data + text[end:]

    return ws.spec(edit)


def added(line: str) -> Callable[[Workspace], str]:
    return lambda ws: ws.spec(lambda t: t + line + "\n")


BOMB = b"""\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
name: *i
"""
SPACE = "  learning_rate: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}"
HEADER = b"text\tlabel\n"

SPEC_CASES = [
    # the YAML file itself
    Case("missing file", create(lambda ws: str(ws.tmp / "nope.yaml")), ["does not exist"]),
    Case(
        "not UTF-8",
        create(lambda ws: ws.raw_spec(b"name: \xff\xfe\n")),
        ["not UTF-8 text (byte 6)"],
    ),
    Case(
        "too large", create(lambda ws: ws.raw_spec(b"#" * (1 << 20) + b"x")), ["more than 1048576"]
    ),
    Case(
        "billion laughs", create(lambda ws: ws.raw_spec(BOMB)), ["aliases (*name) are not allowed"]
    ),
    Case("duplicate key", create(added("seed: 9")), ["duplicate key 'seed'; keep one of them"]),
    Case("YAML syntax", create(lambda ws: ws.raw_spec(b"name: [unclosed\n")), ["not valid YAML"]),
    Case("empty file", create(lambda ws: ws.raw_spec(b"")), ["the top level must be a mapping"]),
    Case(
        "a list", create(lambda ws: ws.raw_spec(b"- a\n- b\n")), ["the top level must be a mapping"]
    ),
    # values
    Case("unknown key", create(added("lerning_rate: 1")), ["lerning_rate: unknown key"]),
    Case(
        "replicates initial > max",
        create(added("replicates: {max_seeds: 2, initial_seeds: 3}")),
        ["initial_seeds 3 must not exceed max_seeds 2"],
    ),
    Case(
        "unknown task",
        create(yaml_edit("task: sst2", "task: sst3")),
        ["task: 'sst3' is not allowed"],
    ),
    Case(
        "n_trials 10**12",
        create(yaml_edit("n_trials: 3", "n_trials: 1000000000000")),
        ["n_trials: got 1000000000000; input should be less than or equal to 100000"],
    ),
    Case(
        "n_trials true",
        create(yaml_edit("n_trials: 3", "n_trials: true")),
        ["n_trials: got True, a boolean, where a number is expected; give a number"],
    ),
    Case(
        "n_trials text",
        create(yaml_edit("n_trials: 3", "n_trials: many")),
        ["n_trials: got 'many'"],
    ),
    Case(
        "seed 10**30",
        create(yaml_edit("seed: 7", "seed: 1000000000000000000000000000000")),
        ["seed: got 1000000000000000000000000000000", "less than or equal to 4294967295"],
    ),
    Case("negative seed", create(yaml_edit("seed: 7", "seed: -1")), ["seed: got -1"]),
    Case(
        "eval_batch_size 10**12",
        create(added("eval_batch_size: 1000000000000")),
        ["eval_batch_size: got 1000000000000; input should be less than or equal to 4096"],
    ),
    Case(
        "batch_size range below 1",
        create(yaml_edit("choices: [16, 32]", "choices: [-64, 32]")),
        ["search_space.batch_size.choices: -64 is outside what batch_size allows"],
    ),
    Case(
        "epochs range below 1",
        create(
            yaml_edit(
                "epochs: {type: int, low: 1, high: 2}", "epochs: {type: int, low: -5, high: 2}"
            )
        ),
        ["search_space.epochs.low: -5 is outside what epochs allows"],
    ),
    Case(
        "learning_rate high inf",
        create(yaml_edit(SPACE, SPACE.replace("1.0e-2", ".inf"))),
        ["search_space.learning_rate.high: got inf; input should be a finite number"],
    ),
    Case(
        "learning_rate high 5",
        create(yaml_edit(SPACE, SPACE.replace("1.0e-2", "5.0"))),
        ["search_space.learning_rate.high: 5.0 is outside what learning_rate allows"],
    ),
    Case(
        "default learning_rate NaN",
        create(yaml_edit("learning_rate: 1.0e-3\n", "learning_rate: .nan\n")),
        ["defaults.learning_rate: got nan; input should be a finite number"],
    ),
    Case(
        "temperature true",
        create(added("thresholds: {sigma_max: true}")),
        ["thresholds.sigma_max", "a boolean"],
    ),
    Case(
        "name with newline",
        create(yaml_edit("name: bad", 'name: "bad\\n"')),
        ["name: 'bad\\n' must be 1-128 ASCII letters"],
    ),
    Case(
        "non-ASCII name",
        create(yaml_edit("name: bad", "name: étude")),
        ["name: 'étude' must be 1-128 ASCII letters"],
    ),
    Case(
        "grace below interval",
        create(yaml_edit("heartbeat_interval_s: 1", "heartbeat_interval_s: 5")),
        ["grace_period_s 4 must be at least twice heartbeat_interval_s 5"],
    ),
    Case(
        "huge value is not printed", create(added("task2: " + "x" * 5000)), ["task2: unknown key"]
    ),
    # data files, read before anything is stored
    Case(
        "data folder missing",
        create(lambda ws: ws.spec(lambda t: t.replace(str(ws.data), str(ws.tmp / "none")))),
        ["data.path: folder", "does not exist"],
    ),
    Case(
        "data wrong header",
        create(lambda ws: ws.data_file("train", b"review\tstars\nok\t1\n")),
        ["none of the columns ['sentence', 'text'] in header ['review', 'stars']"],
    ),
    Case(
        "data label outside the task",
        create(lambda ws: ws.data_file("train", HEADER + b"a fine film\t7\n")),
        ["train.tsv, line 2: label '7' is not 0, 1"],
    ),
    Case(
        "data empty file",
        create(lambda ws: ws.data_file("train", b"")),
        ["train.tsv: the file is empty"],
    ),
    Case(
        "data header only",
        create(lambda ws: ws.data_file("train", HEADER)),
        ["train.tsv: has a header but no rows"],
    ),
    Case(
        "data empty dev",
        create(lambda ws: ws.data_file("dev", HEADER)),
        ["dev.tsv: has a header but no rows"],
    ),
    Case(
        "data not UTF-8",
        create(lambda ws: ws.data_file("train", HEADER + b"caf\xe9\t1\n")),
        ["train.tsv: not UTF-8 text (byte 14)"],
    ),
    Case(
        "data dev missing",
        create(lambda ws: (ws.data / "dev.tsv").unlink() or ws.spec()),
        ["has no dev.tsv"],
    ),
    # model folders, checked before anything is stored
    Case(
        "model config {}",
        create(lambda ws: ws.model_file("config.json", b"{}")),
        ["is not a model config"],
    ),
    Case(
        "model config not JSON",
        create(lambda ws: ws.model_file("config.json", b"{oops")),
        ["cannot be read as JSON"],
    ),
    Case(
        "model weights truncated",
        create(
            lambda ws: ws.model_file(
                "model.safetensors", (ws.model / "model.safetensors").read_bytes()[:-100]
            )
        ),
        ["is not a complete safetensors file"],
    ),
    Case(
        "model weights garbage",
        create(lambda ws: ws.model_file("model.safetensors", b"\x00" * 64)),
        ["is not a complete safetensors file"],
    ),
    Case(
        "model weights missing",
        create(lambda ws: ws.model_file("model.safetensors", None)),
        ["has no weights"],
    ),
    Case(
        "model without tokenizer",
        create(
            lambda ws: ws.model_file("tokenizer.json", None) or ws.model_file("vocab.txt", None)
        ),
        ["has no tokenizer files"],
    ),
    Case(
        "model folder missing",
        create(
            lambda ws: ws.spec(
                lambda t: t.replace(f"model: {ws.model}", f"model: {ws.tmp / 'none'}")
            )
        ),
        ["teacher.model: model folder", "does not exist"],
    ),
    Case(
        "package not installed",
        create(
            lambda ws: ws.spec(
                lambda t: t.replace(f"model: {ws.model}", "model: package:no_such_pkg")
            )
        ),
        ["package 'no_such_pkg' is not installed"],
    ),
    # YAML shapes
    Case(
        "deep nesting",
        create(lambda ws: ws.raw_spec(b"name: " + b"[" * 5000 + b"]" * 5000 + b"\n")),
        ["nested more than 32 levels deep"],
    ),
    Case(
        "complex key",
        create(lambda ws: ws.raw_spec(b"? [a, b]\n: 1\n")),
        ["a key is a list or a mapping"],
    ),
    # names and paths
    Case(
        "name of 100000 characters",
        create(yaml_edit("name: bad", "name: " + "x" * 100_000)),
        ["must be 1-128 ASCII letters", "(100002 chars)"],
    ),
    Case(
        "model path too long",
        create(
            lambda ws: ws.spec(lambda t: t.replace(f"model: {ws.model}", "model: /" + "a" * 5000))
        ),
        ["teacher.model:", "is longer than this system allows (5001 characters)"],
    ),
    Case(
        "malformed package name",
        create(
            lambda ws: ws.spec(lambda t: t.replace(f"model: {ws.model}", "model: package:../x"))
        ),
        ["teacher.model: 'package:../x' does not name a Python package"],
    ),
    Case(
        "data path too long",
        create(lambda ws: ws.spec(lambda t: t.replace(f"path: {ws.data}", "path: /" + "d" * 5000))),
        ["data.path:", "is longer than this system allows"],
    ),
    # contradictions with the models and the data
    Case(
        "teacher_layers beyond the teacher",
        create(yaml_edit("teacher_layers: 1", "teacher_layers: 5")),
        ["student.teacher_layers 5: the teacher", "has 2 layers", "Use at most 2"],
    ),
    Case(
        "searched teacher_layers beyond the teacher",
        create(yaml_edit(SPACE, SPACE + "\n  teacher_layers: {type: int, low: 1, high: 4}")),
        ["search_space.teacher_layers (up to 4): the teacher", "has 2 layers"],
    ),
    Case(
        "max_seq_length beyond the position embeddings",
        create(yaml_edit("max_seq_length: 32", "max_seq_length: 256")),
        ["max_seq_length 256 is beyond teacher.model's 128 position embeddings"],
    ),
    Case(
        "data of a single class",
        create(lambda ws: ws.data_file("train", HEADER + b"a fine film\t1\na good one\t1\n")),
        ["every train row is class", "needs rows of two classes or more"],
    ),
    Case(
        "duplicate label names",
        create(yaml_edit("  dev_limit: 64", "  dev_limit: 64\n  labels: [neg, neg]")),
        ["labels: 'neg' is listed more than once"],
    ),
    Case(
        "list-valued labels in JSON Lines",
        create(lambda ws: jsonl_spec(ws, b'{"text": "a fine film", "label": [1, 0]}\n')),
        ["label"],
    ),
    Case(
        "empty search space",
        create(
            lambda ws: ws.spec(
                lambda t: (
                    t[: t.index("search_space:")] + "search_space: {}\n" + t[t.index("defaults:") :]
                )
            )
        ),
        ["search_space is empty", "set n_trials to at most 1"],
    ),
    Case(
        "create --artifacts is a file",
        lambda ws: [
            "study",
            "create",
            ws.spec(),
            "--storage",
            ws.storage,
            "--artifacts",
            str(ws.data / "train.tsv"),
        ],
        ["artifact location", "is a file, not a folder; give a folder"],
        code=4,
    ),
    # storage URLs
    Case(
        "in-memory SQLite",
        lambda ws: ["study", "create", ws.spec(), "--storage", "sqlite://"],
        ["is an in-memory SQLite database"],
    ),
    Case(
        "driver not installed",
        lambda ws: ["study", "create", ws.spec(), "--storage", "mysql+pymysql://u@127.0.0.1/x"],
        ["needs the mysql driver 'pymysql'"],
    ),
    Case(
        "empty --storage",
        lambda ws: ["study", "create", ws.spec(), "--storage", ""],
        ["storage must be a non-empty text, not ''; give a database URL"],
    ),
    Case(
        "read-only SQLite folder",
        lambda ws: ["study", "create", ws.spec(), "--storage", f"sqlite:///{read_only(ws)}/k.db"],
        ["is read-only"],
        code=3,
    ),
    # the storage
    Case(
        "not a database URL",
        lambda ws: ["study", "create", ws.spec(), "--storage", "not a url"],
        ["is not a database URL"],
    ),
    Case(
        "unreachable database",
        lambda ws: [
            "study",
            "create",
            ws.spec(),
            "--storage",
            "postgresql+psycopg2://kd:pw@127.0.0.1:1/kd",
        ],
        ["cannot reach the storage"],
        code=3,
    ),
]


@pytest.fixture()
def workspace(tmp_path: Path, tiny_bert_dir: Path, pg_url: str) -> Workspace:
    model, data = tmp_path / "model", tmp_path / "data"
    shutil.copytree(tiny_bert_dir, model)
    shutil.copytree(FIXTURES / "glue" / "SST-2", data)
    return Workspace(tmp_path, model, data, pg_url)


@pytest.mark.parametrize("case", SPEC_CASES, ids=str)
def test_a_bad_spec_or_input_is_refused_and_nothing_is_stored(
    case: Case, workspace: Workspace
) -> None:
    result = kdsearch(*case.args(workspace), env=case.env, cwd=workspace.tmp, timeout=60)
    assert_clean_failure(result, *case.words, code=case.code)
    assert len(result.stderr) < 4000, "a message, not a dump"
    engine = sqlalchemy.create_engine(workspace.storage)
    with engine.connect() as conn:
        assert sqlalchemy.inspect(conn).get_table_names() == []  # the database untouched
    engine.dispose()
    assert not (workspace.tmp / "kdsearch.db").exists()


def test_the_good_spec_of_the_table_is_accepted(workspace: Workspace) -> None:
    # The table's rows break a spec that is otherwise fine.
    result = kdsearch("study", "create", workspace.spec(), "--storage", workspace.storage)
    assert result.returncode == 0, result.stderr


# Commands on an existing study: a bad option or environment changes nothing stored.
def worker(*extra: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: ["worker", "--study", "bad", "--storage", ws.storage, *extra]


def score(teacher: bytes, student: bytes | None = None) -> Callable[[Workspace], list[str]]:
    def args(ws: Workspace) -> list[str]:
        t, s = ws.tmp / "t.csv", ws.tmp / "s.csv"
        t.write_bytes(b"pred,p0,p1,label\n" + teacher)
        s.write_bytes(b"pred,p0,p1,label\n" + (student if student is not None else teacher))
        return ["score", "--teacher", str(t), "--student", str(s)]

    return args


def fifo(ws: Workspace) -> str:
    """A named pipe: opening it to read would block forever."""
    path = ws.tmp / "pipe.csv"
    if not path.exists():
        os.mkfifo(path)
    return str(path)


def read_only(ws: Workspace) -> Path:
    """A folder not even root can write to (immutable), or the test is skipped."""
    folder = ws.tmp / "read-only"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    return folder


RUN_CASES = [
    Case(
        "unknown study",
        lambda ws: ["status", "--study", "nope", "--storage", ws.storage],
        ["study 'nope' does not exist"],
    ),
    Case(
        "worker on an unknown study",
        lambda ws: ["worker", "--study", "nope", "--storage", ws.storage],
        ["study 'nope' does not exist"],
    ),
    Case("--threads -1", worker("--threads", "-1"), ["--threads: -1 must be at least 1"]),
    Case("--workers-per-gpu 0", worker("--workers-per-gpu", "0"), ["must be at least 1"]),
    Case("--storage-timeout -1", worker("--storage-timeout", "-1"), ["must be a positive"]),
    Case("--device bogus", worker("--device", "bogus"), ["--device 'bogus' is not a device"]),
    Case("--device tpu", worker("--device", "xla"), ["--device 'xla' is not supported"]),
    Case(
        "--device cuda without a GPU",
        worker("--device", "cuda:0"),
        ["no GPU is visible"],
        env={"CUDA_VISIBLE_DEVICES": ""},
    ),
    Case(
        "--artifacts is a file",
        lambda ws: worker("--artifacts", str(ws.data / "train.tsv"))(ws),
        ["cannot use the artifact folder"],
        code=4,
    ),
    Case(
        "--artifacts read-only",
        lambda ws: worker("--artifacts", str(read_only(ws)))(ws),
        ["cannot use the artifact folder", "Operation not permitted"],
        code=4,
    ),
    Case(
        "--artifacts not a location",
        worker("--artifacts", "gs://b"),
        ["neither a folder nor s3://"],
    ),
    Case(
        "--cache-dir is a file",
        lambda ws: worker(
            "--artifacts", str(ws.tmp / "a"), "--cache-dir", str(ws.data / "dev.tsv")
        )(ws),
        ["cannot write the asset cache"],
        code=4,
    ),
    Case(
        "--cache-dir read-only",
        lambda ws: worker("--artifacts", str(ws.tmp / "a"), "--cache-dir", str(read_only(ws)))(ws),
        ["cannot write the asset cache"],
        code=4,
    ),
    Case(
        "--gpu-lock-dir is a file",
        lambda ws: worker("--gpu", "auto", "--gpu-lock-dir", str(ws.data / "dev.tsv"))(ws),
        ["cannot use the GPU claim folder"],
        code=4,
        env={"CUDA_VISIBLE_DEVICES": "0"},
    ),
    Case(
        "export --trial -1",
        lambda ws: [
            "export",
            "--study",
            "bad",
            "--trial",
            "-1",
            "--out",
            str(ws.tmp / "o"),
            "--storage",
            ws.storage,
        ],
        ["is not a trial number"],
    ),
    Case(
        "export a queued trial",
        lambda ws: [
            "export",
            "--study",
            "bad",
            "--trial",
            "0",
            "--out",
            str(ws.tmp / "o"),
            "--storage",
            ws.storage,
        ],
        ["trial 0 of 'bad' is WAITING"],
    ),
    Case(
        "export into a file",
        lambda ws: [
            "export",
            "--study",
            "bad",
            "--out",
            str(ws.data / "dev.tsv"),
            "--storage",
            ws.storage,
        ],
        ["is not empty"],
    ),
    Case(
        "report on an unknown study",
        lambda ws: ["report", "--study", "bad", "--study", "nope", "--storage", ws.storage],
        ["study 'nope' does not exist"],
    ),
    Case(
        "dashboard --port 0",
        lambda ws: ["dashboard", "--port", "0", "--storage", ws.storage],
        ["0 must be at least 1"],
    ),
    Case(
        "unhalt an unknown study",
        lambda ws: ["study", "unhalt", "nope", "--storage", ws.storage],
        ["study 'nope' does not exist"],
    ),
    Case(
        "score: missing file",
        lambda ws: [
            "score",
            "--teacher",
            str(ws.tmp / "no.csv"),
            "--student",
            str(ws.tmp / "no.csv"),
        ],
        ["no.csv: cannot be read"],
    ),
    Case("score: not UTF-8", score(b"0,0.9,0.1,\xff\n"), ["not UTF-8 text"]),
    Case(
        "score: NaN",
        score(b"0,nan,0.1,0\n"),
        ["data row 1 has probabilities [nan, 0.1], not numbers in [0, 1]"],
    ),
    Case("score: infinite", score(b"0,inf,0.1,0\n"), ["not numbers in [0, 1]"]),
    Case("score: negative", score(b"1,-0.2,1.2,1\n"), ["data row 1 has probabilities [-0.2, 1.2]"]),
    Case(
        "score: unknown --task",
        lambda ws: [*score(b"0,0.9,0.1,0\n")(ws), "--task", "sst3"],
        ["--task 'sst3' is not a task"],
    ),
    Case("score: no rows", score(b"", b""), ["has a header but no rows"]),
    Case(
        "score: a folder",
        lambda ws: ["score", "--teacher", str(ws.data), "--student", str(ws.data)],
        ["not a regular file"],
    ),
    Case(
        "score: a FIFO",
        lambda ws: ["score", "--teacher", fifo(ws), "--student", fifo(ws)],
        ["not a regular file"],
    ),
    Case(
        "score: a row with more fields than columns",
        score(b"0,0.9,0.1,0,7\n"),
        ["data row 1 has 5 fields but the header has 4"],
    ),
    Case(
        "score: pred contradicts the probabilities",
        score(b"1,0.9,0.1,0\n"),
        ["data row 1 says pred 1 but its probabilities are [0.9, 0.1]"],
    ),
    Case(
        "score: label beyond the columns",
        score(b"0,0.9,0.1,4\n"),
        ["data row 1 has label 4, but the file has 2 probability columns"],
    ),
    Case(
        "export --out unwritable",
        lambda ws: [
            "export",
            "--study",
            "bad",
            "--out",
            str(read_only(ws) / "out"),
            "--storage",
            ws.storage,
        ],
        ["cannot write the export to"],
        code=4,
    ),
    Case(
        "dashboard on a bad host",
        lambda ws: [
            "dashboard",
            "--host",
            "203.0.113.7",
            "--port",
            "8799",
            "--storage",
            ws.storage,
        ],
        ["--host '203.0.113.7' is not an address of this machine"],
    ),
    Case(
        "--mlflow without MLflow",
        lambda ws: [*worker("--artifacts", str(ws.tmp / "a"), "--mlflow", "file:./m")(ws)],
        ["MLflow is not installed"],
        code=4,
        env={"PYTHONPATH": str(FIXTURES / "no-mlflow")},
    ),
    Case(
        "a study name of 100000 characters",
        lambda ws: ["status", "--study", "y" * 100_000, "--storage", ws.storage],
        ["does not exist"],
    ),
]


@pytest.fixture()
def study(workspace: Workspace) -> Workspace:
    spec = load_spec(write_spec(workspace.tmp / "good.yaml", workspace.spec_text()))
    create_or_attach(open_storage(workspace.storage), spec)
    return workspace


@pytest.mark.parametrize("case", RUN_CASES, ids=str)
def test_a_bad_option_or_file_is_refused_and_the_study_is_unchanged(
    case: Case, study: Workspace
) -> None:
    try:
        result = kdsearch(*case.args(study), env=case.env, cwd=study.tmp, timeout=120)
    finally:
        subprocess.run(["chattr", "-i", str(study.tmp / "read-only")], capture_output=True)
    assert_clean_failure(result, *case.words, code=case.code)
    stored = optuna.load_study(study_name="bad", storage=study.storage)
    assert [t.state.name for t in stored.trials] == ["WAITING"]  # only the queued baseline
    assert StudyAttr.ARTIFACTS not in stored.user_attrs  # not even the artifact location


@pytest.mark.parametrize("command", ["create", "status"])
def test_a_database_with_a_foreign_studies_table_is_refused_untouched(
    command: str, workspace: Workspace
) -> None:
    engine = sqlalchemy.create_engine(workspace.storage)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE studies (id serial PRIMARY KEY, title text)")
        conn.exec_driver_sql("INSERT INTO studies (title) VALUES ('not optuna')")
    args = (
        ["study", "create", workspace.spec()]
        if command == "create"
        else ["status", "--study", "bad"]
    )
    result = kdsearch(*args, "--storage", workspace.storage, cwd=workspace.tmp)
    assert_clean_failure(result, "has a 'studies' table that is not Optuna's", code=2)
    with engine.connect() as conn:
        tables = sqlalchemy.inspect(conn).get_table_names()
        rows = conn.exec_driver_sql("SELECT title FROM studies").fetchall()
    engine.dispose()
    assert tables == ["studies"] and rows == [("not optuna",)]  # nothing added or changed


def test_a_database_of_a_newer_optuna_is_refused(study: Workspace) -> None:
    engine = sqlalchemy.create_engine(study.storage)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE version_info SET schema_version = 99")
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'v99.0.0.z'")
    engine.dispose()
    for args in (["status", "--study", "bad"], ["worker", "--study", "bad"]):
        result = kdsearch(*args, "--storage", study.storage, cwd=study.tmp, timeout=120)
        assert_clean_failure(result, "schema", code=2)
