"""The package's shape: one installed namespace, the study side below the compute side,
the committed JSON Schema in step with the typed spec, every attribute key declared."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from kdsearch.service.record import (
    STUDY_KEYS,
    TRIAL_KEYS,
    SystemAttr,
    TrialAttr,
    set_trial_attrs,
)
from kdsearch.service.spec import SCHEMA_FILE, json_schema
from kdsearch.service.storage import open_storage
from tests.helpers import ROOT

SIDES = {"service": ROOT / "service", "workers": ROOT / "workers", "kdsearch": ROOT / "kdsearch"}


def _imports(folder: Path) -> dict[str, set[str]]:
    """Every module each file imports, at any depth (lazy imports inside functions too)."""
    out = {}
    for path in sorted(folder.glob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out[path.name] = names
    return out


def test_the_study_side_never_imports_the_compute_side_or_torch() -> None:
    for name, imported in _imports(SIDES["service"]).items():
        upward = {
            m for m in imported
            if m.startswith(("kdsearch.workers", "kdsearch.cli", "kdsearch.api", "torch",
                             "transformers", "service", "workers"))
            and not m.startswith("kdsearch.service")
        }  # fmt: skip
        assert not upward, f"service/{name} imports {sorted(upward)}"


def test_the_compute_side_never_imports_the_cli_or_the_api() -> None:
    for name, imported in _imports(SIDES["workers"]).items():
        bad = {m for m in imported if m.startswith(("kdsearch.cli", "kdsearch.api", "service."))}
        bad |= {m for m in imported if m == "workers" or m.startswith("workers.")}
        assert not bad, f"workers/{name} imports {sorted(bad)}"


def test_every_import_is_inside_the_namespace() -> None:
    # Code imports kdsearch.*, never the folders' bare names (they are not installed).
    for side, folder in SIDES.items():
        for name, imported in _imports(folder).items():
            bare = {m for m in imported if m.split(".")[0] in ("service", "workers")}
            assert not bare, f"{side}/{name} imports {sorted(bare)}"


def test_the_wheel_installs_only_kdsearch(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("kdsearch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "kdsearch",
        wheel.name.split("-py3")[0] + ".dist-info",
    }
    assert "kdsearch/service/spec.py" in names and "kdsearch/workers/worker.py" in names
    assert "kdsearch/cli.py" in names and "kdsearch/py.typed" in names


def test_a_folder_named_kdsearch_in_the_working_directory_does_not_shadow_it(
    tmp_path: Path,
) -> None:
    # A notebook opened in the clone's parent folder: the clone is ./kdsearch (no
    # __init__.py at its root), and the installed package must still be the one imported.
    clone = tmp_path / "kdsearch"
    (clone / "service").mkdir(parents=True)
    (clone / "README.md").write_text("a clone\n")
    result = subprocess.run(
        [sys.executable, "-c", "import kdsearch; print(kdsearch.create_study.__module__)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "kdsearch.api"


def test_the_committed_json_schema_is_up_to_date() -> None:
    committed = json.loads((ROOT / "studies" / SCHEMA_FILE).read_text())
    assert committed == json_schema(), (
        f"studies/{SCHEMA_FILE} is stale: run `kdsearch study schema > studies/{SCHEMA_FILE}`"
    )


SHIPPED = sorted((ROOT / "studies").rglob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_matches_the_json_schema_and_points_at_it(path: Path) -> None:
    text = path.read_text()
    jsonschema.validate(yaml.safe_load(text), json_schema())
    schema = Path(text.splitlines()[0].split("$schema=", 1)[1])
    assert (path.parent / schema).resolve() == ROOT / "studies" / SCHEMA_FILE


def test_the_json_schema_catches_what_editors_should_flag() -> None:
    schema = json_schema()
    with pytest.raises(jsonschema.ValidationError, match="lerning_rate"):
        jsonschema.validate({"name": "x", "lerning_rate": 1}, schema)
    assert "kappa" in json.dumps(schema["$defs"]["Thresholds"])  # field docs travel along


def test_an_undeclared_attr_key_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    import optuna

    storage = open_storage(f"sqlite:///{tmp_path / 'k.db'}")
    study = optuna.create_study(storage=storage, directions=["minimize", "minimize"])
    trial = study.ask()
    with pytest.raises(KeyError, match=r"\['sigmaa'\] are not declared"):
        set_trial_attrs(storage, trial._trial_id, {TrialAttr.ERROR: "x", "sigmaa": 0.1})
    assert storage.get_trial(trial._trial_id).user_attrs == {}
    set_trial_attrs(storage, trial._trial_id, {TrialAttr.ERROR: "x", "sigma": 0.1})
    assert storage.get_trial(trial._trial_id).user_attrs == {"error": "x", "sigma": 0.1}


def test_declared_keys_are_distinct_and_prefixed_where_bookkeeping() -> None:
    assert all(k.startswith("kdsearch:") for k in STUDY_KEYS)
    for key in (TrialAttr.ROLE, TrialAttr.ATTEMPT, TrialAttr.RETRY_OF, TrialAttr.TRIAL_CONFIG):
        assert key.startswith("kdsearch:") and key in TRIAL_KEYS


# The import name of each distribution, where it differs.
_IMPORT_NAMES = {
    "pyyaml": "yaml",
    "psycopg2-binary": "psycopg2",
    "optuna-dashboard": "optuna_dashboard",
    "mlflow-skinny": "mlflow",
}


def test_every_third_party_import_is_declared() -> None:
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [*project["dependencies"], *extras["s3"], *extras["tracking"]]
    names = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in declared}
    importable = {_IMPORT_NAMES.get(n, n.replace("-", "_")) for n in names} | {"botocore"}
    used = set()
    for folder in SIDES.values():
        for imported in _imports(folder).values():
            used |= {m.split(".")[0] for m in imported}
    third_party = {m for m in used if m not in sys.stdlib_module_names and m != "kdsearch"}
    assert third_party <= importable, sorted(third_party - importable)


# The record owns every key: outside service/record.py no string literal names a trial or
# study attribute (as a key read from or written to attrs), and no literal is one of the
# prefixed keys.
_DECLARED = (
    TRIAL_KEYS
    | STUDY_KEYS
    | {v for k, v in vars(SystemAttr).items() if k.isupper() and isinstance(v, str)}
)
_ATTR_CALLS = {
    "set_user_attr", "set_system_attr", "set_trial_user_attr", "set_trial_system_attr",
    "set_study_user_attr", "set_study_system_attr",
}  # fmt: skip


def _key_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String literals used as attribute keys: ``x.user_attrs["k"]``, ``attrs.get("k")``,
    ``set_user_attr("k", ...)``, and any literal that is a prefixed kdsearch key."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            target = node.value
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name.endswith("attrs") and isinstance(node.slice.value, str):
                found.append((node.lineno, node.slice.value))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = (
                owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            )
            keyed = node.func.attr in _ATTR_CALLS or (
                node.func.attr in ("get", "pop", "setdefault") and owner_name.endswith("attrs")
            )
            for arg in node.args[:2] if keyed else []:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((node.lineno, arg.value))
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith("kdsearch:") and node.value in _DECLARED:
                found.append((node.lineno, node.value))
    return found


def test_no_string_key_outside_the_record_names_an_attribute() -> None:
    offenders = []
    for folder in SIDES.values():
        for path in sorted(folder.glob("*.py")):
            if path == ROOT / "service" / "record.py":
                continue
            for line, key in _key_literals(ast.parse(path.read_text())):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {key!r}")
    assert not offenders, "use the record's constants (service/record.py):\n" + "\n".join(offenders)


def test_the_key_check_catches_a_literal_key() -> None:
    code = (
        'trial.user_attrs["sigma"]\nstudy.user_attrs.get("kdsearch:spec")\nt.set_user_attr("x", 1)'
    )
    assert [k for _, k in _key_literals(ast.parse(code))] == [
        "sigma",
        "kdsearch:spec",
        "x",
        "kdsearch:spec",
    ]


def _methods(path: Path, cls: str) -> dict[str, set[str]]:
    """The attributes each method of class ``cls`` assigns on ``self``."""
    (node,) = [
        n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == cls
    ]
    out = {}
    for method in node.body:
        if isinstance(method, ast.FunctionDef):
            out[method.name] = {
                t.attr
                for n in ast.walk(method)
                if isinstance(n, ast.Assign | ast.AnnAssign)
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "self"
            }
    return out


def test_the_worker_keeps_no_per_trial_state() -> None:
    # Set up once (__init__, setup), plus two worker-wide counters; everything a trial
    # owns lives in its TrialSession.
    methods = _methods(ROOT / "workers" / "worker.py", "Worker")
    during_the_loop = set().union(
        *(a for m, a in methods.items() if m not in ("__init__", "setup"))
    )
    assert during_the_loop <= {"_deadline", "_noted"}, during_the_loop


# Signatures another library sets (transformers' attention interface).
_IMPOSED = {("intermediate.py", "_scores_attention")}


def test_no_compute_side_function_takes_more_than_six_parameters() -> None:
    wide = []
    for path in sorted((ROOT / "workers").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            a = node.args
            names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
            names += [v.arg for v in (a.vararg, a.kwarg) if v is not None]
            names = [n for n in names if n not in ("self", "cls")]
            if len(names) > 6 and (path.name, node.name) not in _IMPOSED:
                wide.append(f"workers/{path.name}: {node.name}({', '.join(names)})")
    assert not wide, wide
