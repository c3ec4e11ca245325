"""Loading a study spec: YAML (or a mapping) -> ``StudySpec``, with every problem collected.

``load_spec`` reads a YAML file once at the edge (the CLI, the Python API), refuses what
no study YAML is (too large, not UTF-8, aliases, duplicate keys), validates it against the
typed schema (``service/spec.py``) and words every problem as "where: value, rule, fix",
all of them in one ``SpecError``. ``checks`` adds problems found outside the schema (the
data files and model folders, ``workers/preflight.py``), reported with the schema's.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kdsearch.service.errors import SpecError
from kdsearch.service.spec import (
    HYPERPARAMETER_NAMES,
    MAX_SPEC_BYTES,
    PACKAGE_PREFIX,
    SEARCH_SPACE,
    Hyperparameters,
    Stage1Spec,
    StudentSpec,
    StudySpec,
    name_problems,
    search_space_problems,
    short,
)

# Extra checks of a raw spec mapping (paths made absolute): problems worded as the schema's.
RawChecks = Callable[[dict[str, Any]], list[str]]


# A study spec is nested four levels deep; PyYAML composes recursively, so a file nested
# thousands of levels deep would end in a RecursionError.
MAX_YAML_DEPTH = 32


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: no aliases (a "billion laughs" file expands
    exponentially through them, and a study spec has no use for them), no duplicate keys
    (the second would silently win), no keys that are lists or mappings, no nesting deeper
    than ``MAX_YAML_DEPTH``."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a study spec; write the value "
                "out", event.start_mark,
            )  # fmt: skip
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_YAML_DEPTH} levels deep; a study spec is "
                "a few levels of keys", self.peek_event().start_mark,
            )  # fmt: skip
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key is a list or a mapping; keys are plain names like "
                    "'learning_rate'", key_node.start_mark,
                )  # fmt: skip
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; keep one of them", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_spec(path: str | Path, checks: RawChecks | None = None) -> StudySpec:
    """Read and validate a study YAML; relative model/data paths resolve against its folder."""
    path = Path(path)
    if (problem := path_error(str(path))) is not None:
        raise SpecError(short(str(path)), [f"the path {problem}; give a study YAML path"])
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
    return spec_from_dict(raw, source=str(path), base_dir=path.resolve().parent, checks=checks)


def path_error(path: str) -> str | None:
    """Why ``path`` cannot even be looked up (longer than the OS allows, a NUL byte), or
    None (it may still not exist)."""
    try:
        os.stat(path)
    except ValueError:
        return "contains a NUL byte"
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return f"is longer than this system allows ({len(path)} characters)"
    return None


def spec_from_dict(
    raw: Any, source: str, base_dir: Path | None = None, checks: RawChecks | None = None
) -> StudySpec:
    """Validate a spec mapping (relative paths resolve against ``base_dir``)."""
    if not isinstance(raw, dict):
        raise SpecError(source, [f"the top level must be a mapping of keys, got {short(raw)}"])
    if base_dir is not None:
        raw = _resolve_paths(raw, base_dir)
    problems = checks(raw) if checks is not None else []
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
    problems = name_problems(name) if isinstance(name, str) else []
    try:
        defaults = Hyperparameters.model_validate(raw.get("defaults") or {})
        space = SEARCH_SPACE.validate_python(raw.get("search_space") or {})
    except ValidationError:
        return problems  # the rest is already reported as field errors
    try:
        stage1 = Stage1Spec.model_validate(raw["stage1"]) if raw.get("stage1") is not None else None
        student = StudentSpec.model_validate(raw.get("student"))
    except ValidationError:
        return problems
    for key, param in space.items():
        problems += search_space_problems(key, param, defaults, stage1, student)
    return problems


def is_local_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or Path(ref).exists()


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Make relative local paths absolute against the YAML's folder (copying, not mutating)."""

    def resolve(ref: Any, always: bool) -> Any:
        """``always``: a key that only ever names a local file or folder (a relative name
        is the YAML's neighbour even before it exists: ``kdsearch augment`` writes
        ``train_augmented`` there); otherwise a relative name that does not exist may be
        a hub id."""
        if not isinstance(ref, str) or ref.startswith(PACKAGE_PREFIX):
            return ref
        if ref.startswith("~"):
            return str(Path(ref).expanduser())
        if ref.startswith(("./", "../")) or (
            not ref.startswith("/") and (always or (base_dir / ref).exists())
        ):
            return str((base_dir / ref).resolve())
        return ref

    out = dict(raw)
    local = [("data", k) for k in ("path", "train", "dev", "train_augmented")]
    for section, key in [*local, ("data", "dataset"), ("teacher", "model"), ("student", "model")]:
        sub = out.get(section)
        if isinstance(sub, dict) and key in sub:
            out[section] = {**sub, key: resolve(sub[key], (section, key) in local)}
    return out


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
        return [f"{where}: {short(value)} is not allowed; use one of {expected}"]
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
    return [f"{where}: got {short(value)}; {err['msg'].lower()}"]
