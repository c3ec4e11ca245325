"""The study spec: the typed schema of ``studies/*.yaml``.

The pydantic models below *are* the schema (field docstrings document the YAML keys), with
the rules that span several keys (searched ranges against their hyperparameters and
defaults). ``service/loading.py`` reads a YAML file into a frozen ``StudySpec``, collecting
every problem; typed sections are passed down from there, never the raw dict.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

# The GLUE tasks are presets (columns, labels, metric known); "classification" is any
# text-classification data whose columns the spec names.
Task = Literal["sst2", "qqp", "qnli", "mrpc", "rte", "cola", "classification"]
TASKS: tuple[str, ...] = get_args(Task)
GLUE_TASKS: tuple[str, ...] = TASKS[:-1]

# Models are named by a local path, a Hugging Face hub id ("org/name" or "name") or
# "package:NAME", a Python package that bundles a model folder (e.g. the offline MiniLM).
PACKAGE_PREFIX = "package:"
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
        if self.labels is not None:
            repeated = sorted({n for n in self.labels if self.labels.count(n) > 1})
            if repeated:
                problems.append(
                    f"labels: {repeated[0]!r} is listed more than once; each class needs a name "
                    "of its own (in id order)"
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
    matching: Literal["tokens", "padded"] = "tokens"
    """``tokens``: the MSEs average over the real tokens of length-grouped, dynamically
    padded batches. ``padded`` (TinyBERT's): uniformly shuffled batches padded to
    max_seq_length, the MSEs over every position, padded ones included (the pad
    positions' hidden states and attention rows are part of the target), the last, smaller
    batch of an epoch skipped."""
    per_seed: bool = False
    """Run stage 1 in every trial, with the trial's seed, so that seed replicates include
    stage 1's noise (the paper's authors re-ran both stages in every run). False: once per
    study (unless its settings or the student's depth are searched)."""


STAGE1_PREFIX = "stage1_"
# Stage-1 settings that can be searched (``stage1_<name>``).
STAGE1_SEARCHABLE = ("epochs", "learning_rate", "batch_size", "weight_decay")
# The student's depth (student.teacher_layers), searched like a hyperparameter.
DEPTH = "teacher_layers"
HYPERPARAMETER_NAMES = (
    *Hyperparameters.model_fields,
    *(STAGE1_PREFIX + name for name in STAGE1_SEARCHABLE),
    DEPTH,
)
SEARCH_SPACE: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Param])


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
    eval_grid: Literal["kdsearch", "tinybert"] = "kdsearch"
    """When evaluations (selection candidates, pruning probes) happen. ``kdsearch``: every
    ``eval_every_steps`` steps within an epoch and at every epoch end (the last one is
    the final scoring). ``tinybert`` (``task_distill.py``): only after the steps s with
    ``(s + 1) % eval_every_steps == 0``, counted over the run, never at epoch ends: the
    final model is a candidate only when it lands on that grid (without any candidate, the
    final model is scored)."""
    teacher_targets: Literal["eval", "dropout"] = "eval"
    """Stage 2's soft targets (and stage 1's hidden states). ``eval``: the teacher's
    eval-mode logits, computed once per study. ``dropout`` (TinyBERT's, which never calls
    ``teacher_model.eval()``): a train-mode teacher forward at every step, so the student
    fits the dropout-averaged teacher; sigma is still measured against the eval-mode one."""
    student_head: Literal["hf", "tinybert"] = "hf"
    """The student's classification head. ``hf``: Hugging Face's (dropout on the pooled
    output, then the classifier). ``tinybert`` (``TinyBertForSequenceClassification``):
    ``classifier(relu(pooled_output))``, no dropout. BERT students only; the teacher keeps
    its own head."""
    batching: Literal["length_grouped", "tinybert"] = "length_grouped"
    """Stage 2's batches. ``length_grouped``: shuffled batches of similar lengths,
    dynamically padded, every row used. ``tinybert``: uniformly shuffled batches
    (``RandomSampler``) padded to max_seq_length, the last, smaller batch of an epoch
    skipped (``t_total = int(N / batch) * epochs``)."""

    @model_validator(mode="after")
    def _grid_needs_a_step(self) -> TrainingSpec:
        if self.eval_grid == "tinybert" and self.eval_every_steps is None:
            raise ValueError(
                "eval_grid 'tinybert' evaluates only every eval_every_steps steps, and none is "
                "set; set eval_every_steps (TinyBERT's eval_step, e.g. 100)"
            )
        return self


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
    """Two-sided level of each configuration's confidence interval during the search (0.9:
    each bound is a one-sided 95% bound)."""
    confirm_seeds: Int(0, 100) = 0
    """Held-out seeds the search's pick runs on before it is the study's answer (0: no
    confirmation; the answer is then the best candidate, not confirmed; 6 recommended,
    ``docs/answer-reliability.md``). Reserved from ``n_trials`` up front,
    ``confirm_seeds * confirm_candidates`` of them."""
    confirm_candidates: Int(1, 20) = 2
    """How many candidates may be tried in turn on held-out seeds, when one is not confirmed."""
    confirm_confidence: Float(0.5, 0.9999) = 0.9
    """Two-sided level of the confirmation's intervals (0.9: one-sided 95% bounds): a
    candidate is confirmed when the upper bounds of its held-out seeds are within both
    thresholds."""
    confirm_precision: Float(0.001, 1.0) = 0.1
    """The widest the held-out interval of sigma may be on each side, as a fraction of
    ``thresholds.sigma_max`` (0.1: +-0.005 for kappa 0.05). A configuration whose sigma
    moves by +-0.02 from seed to seed is not confirmed by four lucky seeds: a fresh seed
    of it misses kappa a third of the time, and the lucky seeds would report it low."""

    @model_validator(mode="after")
    def _initial_within_max(self) -> ReplicatesSpec:
        if self.initial_seeds > self.max_seeds:
            raise ValueError(
                f"initial_seeds {self.initial_seeds} must not exceed max_seeds {self.max_seeds}; "
                "raise max_seeds or lower initial_seeds"
            )
        if self.confirm_seeds == 1:
            raise ValueError(
                "confirm_seeds 1 cannot confirm anything (an interval needs two seeds); use 0 "
                "(no confirmation) or 2 or more (6 recommended)"
            )
        return self

    @property
    def reserve(self) -> int:
        """Trials of the budget held for confirmation."""
        return self.confirm_seeds * self.confirm_candidates


class SamplerSpec(_Section):
    name: Literal["tpe", "gp", "nsga2", "random"] = "tpe"
    """``tpe`` (default; cheap, many trials), ``gp`` (Optuna's GPSampler: Gaussian-process
    Bayesian optimisation, for expensive trials and small budgets), ``nsga2``, ``random``."""
    n_startup_trials: Int(0, 10**5) = 10
    """TPE and GP: random trials before the model-based search starts."""
    seed: Int(0, 2**32 - 1) | None = None
    """The sampler's seed (default: the study's ``seed``). Trial n's draw is seeded by it
    and n, so a study samples the same configurations whatever its workers; change it to
    repeat a search with other draws but the same teacher and training seeds."""


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
        """Stage 1 runs in every trial (its settings or the student's depth are searched,
        or ``stage1.per_seed``) instead of once per study."""
        if self.stage1 is not None and self.stage1.per_seed:
            return True
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
        if self.training.eval_grid == "tinybert" and self.pruning.probe_every_steps is not None:
            problems.append(
                "pruning.probe_every_steps: with training.eval_grid 'tinybert' the probes are "
                "TinyBERT's evaluations (every eval_every_steps); remove probe_every_steps"
            )
        reserve = self.replicates.reserve
        if reserve and self.n_trials <= reserve:
            problems.append(
                f"n_trials {self.n_trials} leaves nothing to search: replicates.confirm_seeds "
                f"x confirm_candidates reserve {reserve} trials for confirmation; raise n_trials "
                "or lower them"
            )
        most = self.replicates.max_seeds + reserve
        if not self.search_space and self.n_trials > most:
            problems.append(
                f"search_space is empty, so every trial runs the baseline: n_trials "
                f"{self.n_trials} would repeat it beyond its {self.replicates.max_seeds} seed(s)"
                f"{' and the confirmation' if reserve else ''}; search a hyperparameter or set "
                f"n_trials to at most {most}"
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
    problems = name_problems(name)
    for key, param in search_space.items():
        problems += search_space_problems(key, param, defaults, stage1, student)
    return problems


def name_problems(name: str) -> list[str]:
    if _STUDY_NAME.fullmatch(name):
        return []
    return [
        f"name: {short(name)} must be 1-128 ASCII letters, digits, '_', '-' or '.', "
        "starting with a letter or digit; rename the study"
    ]


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: messages never print a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f" ({len(text)} chars)"


def search_space_problems(
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
