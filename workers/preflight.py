"""Checks a study's inputs before it is stored: its data files and model folders.

``kdsearch study create`` (and ``kdsearch.create_study``) run these after the schema checks
and before anything is written, so a wrong header, an unknown label, an empty split, a
file that is not UTF-8, a ``config.json`` that is not a model config or truncated weights
are refused at once, with the file named, instead of failing every trial later.

Torch-free on purpose (it runs where the study is created, which may be a machine
without torch): data through the same reader the workers use, configs as JSON, weights
by their container (safetensors header, zip checksums), never by unpickling.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

from kdsearch.service.errors import KdsearchError, first_line
from kdsearch.service.spec import PACKAGE_PREFIX, StudySpec, is_local_path
from kdsearch.workers.data import load_task_data

logger = logging.getLogger(__name__)

_BERT_KEYS = {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "spiece.model",
    "vocab.json",
    "sentencepiece.bpe.model",
)
_LEGACY_PICKLE = b"\x80"  # a pre-1.6 torch.save file starts with a pickle protocol opcode


def check_study_inputs(spec: StudySpec) -> list[str]:
    """Every problem found in the study's local data and model folders (hub ids and
    datasets are fetched, and so checked, by the first worker)."""
    return _data_problems(spec) + _model_problems(spec)


def _data_problems(spec: StudySpec) -> list[str]:
    data = spec.data
    offline = data.source != "hub" or (data.dataset is not None and is_local_path(data.dataset))
    if not offline:
        return []  # a hub dataset: fetched, and so checked, by the first worker
    try:
        load_task_data(spec)
    except KdsearchError as exc:
        return [f"data: {exc}"]
    return []


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
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [f"{config_file} cannot be read as JSON ({first_line(exc)}); give a model folder"]
    if not isinstance(config, dict) or not (
        isinstance(config.get("model_type"), str) or _BERT_KEYS <= config.keys()
    ):
        problems.append(
            f"{config_file} is not a model config (it names no model_type and is not a BERT "
            "config); give the folder save_pretrained wrote"
        )
    problems += _weights_problems(folder)
    if tokenizer and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        problems.append(
            f"{folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...); save "
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


def require_study_inputs(spec: StudySpec, source: str) -> None:
    """Raise one ``SpecError`` listing every input problem (nothing is stored then)."""
    from kdsearch.service.errors import SpecError

    problems = check_study_inputs(spec)
    if problems:
        raise SpecError(source, problems)
