"""A study's life: create or attach, load its spec, delete it.

Creation is all or nothing: the study, its metric names, the stored spec, the artifact
location (when given) and the enqueued baseline are written in one transaction
(``storage.critical_section``), so a process killed halfway leaves nothing behind, and
two processes creating the same study never both succeed.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import optuna

from kdsearch.service.artifacts import check_location, record_location, resolve_artifacts
from kdsearch.service.errors import KdsearchError
from kdsearch.service.faults import fault_point
from kdsearch.service.record import (
    OBJECTIVES,
    StudyAttr,
    placement_attrs,
    set_study_attr,
)
from kdsearch.service.spec import StudySpec
from kdsearch.service.storage import KdsearchStorage, critical_section, require_study
from kdsearch.service.trial_config import Role, baseline_params, config_id, replicate_seed

logger = logging.getLogger(__name__)


def spec_differences(stored: dict[str, Any], given: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two spec dicts, with both values."""
    out = []
    for key in sorted(set(stored) | set(given)):
        where = f"{prefix}{key}"
        a, b = stored.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_differences(a, b, prefix=f"{where}.")
        elif a != b:
            out.append(f"{where}: stored {json.dumps(a)}, given {json.dumps(b)}")
    return out


def create_or_attach(
    storage: KdsearchStorage, spec: StudySpec, artifacts: str | None = None
) -> bool:
    """Create the study (returns True) or attach to an identical one (returns False).

    ``artifacts``: a location to record (checked first: a folder that can take files, a
    bucket that answers). Creating a study whose name exists with a different spec is
    refused with the list of differing keys."""
    given = spec.to_json_dict()
    if artifacts is not None:
        check_location(resolve_artifacts(artifacts))
    with critical_section(storage, spec.name):
        try:
            study_id = storage.get_study_id_from_name(spec.name)
        except KeyError:
            study_id = None
        if study_id is not None and _half_made(storage, study_id):
            # A create killed before this version made creation one transaction left the
            # study row alone: replace it.
            logger.warning(
                "study %r was left half-made (no spec, no trials): replacing it", spec.name
            )
            storage.delete_study(study_id)
            study_id = None
        if study_id is not None:
            stored = storage.get_study_user_attrs(study_id).get(StudyAttr.SPEC)
            if stored is None:
                raise KdsearchError(
                    f"study {spec.name!r} exists but was not created by kdsearch; choose "
                    f"another name, or remove it with `kdsearch study delete {spec.name}`"
                )
            differences = spec_differences(_as_current(stored), given)
            if differences:
                raise KdsearchError(
                    f"study {spec.name!r} exists with a different spec:\n"
                    + "\n".join(f"  - {d}" for d in differences)
                    + "\nUse a new study name, or restore these values to attach to it."
                )
            if artifacts is not None:
                record_location(storage, study_id, spec.name, artifacts)
            return False
        study = optuna.create_study(
            storage=storage, study_name=spec.name, directions=["minimize", "minimize"]
        )
        study.set_metric_names(list(OBJECTIVES))
        set_study_attr(study, StudyAttr.SPEC, given)
        if artifacts is not None:
            set_study_attr(study, StudyAttr.ARTIFACTS, artifacts)
        # The baseline is enqueued here, once, in the creating transaction: concurrent
        # enqueue_trial calls can duplicate it.
        params = baseline_params(spec)
        attrs = placement_attrs(config_id(params), 0, replicate_seed(spec.seed, 0), Role.BASELINE)
        study.enqueue_trial(params, user_attrs=attrs)
        fault_point("in-create")  # a kill here rolls all of it back
        return True


def _half_made(storage: KdsearchStorage, study_id: int) -> bool:
    """A study row with neither a spec nor a trial: what an interrupted create of an
    earlier version left (an Optuna study of someone else has trials or attrs)."""
    attrs = storage.get_study_user_attrs(study_id)
    return not attrs and not storage.get_all_trials(study_id, deepcopy=False)


def delete_study(storage: KdsearchStorage, name: str) -> int:
    """Delete study ``name`` and everything stored with it (its trials); returns how many
    trials it had. The artifact store's files are left where they are."""
    require_study(storage, name)
    with critical_section(storage, name):
        study_id = storage.get_study_id_from_name(name)
        trials = len(storage.get_all_trials(study_id, deepcopy=False))
        storage.delete_study(study_id)
    return trials


def _as_current(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored spec as this version of kdsearch reads it: keys added since the study was
    created take their defaults, so attaching to an older study compares like with like."""
    try:
        return StudySpec.model_validate(stored).to_json_dict()
    except Exception:
        return stored


def load_stored_spec(storage: optuna.storages.BaseStorage, name: str) -> StudySpec:
    require_study(storage, name)
    study_id = storage.get_study_id_from_name(name)
    stored = storage.get_study_user_attrs(study_id).get(StudyAttr.SPEC)
    if stored is None:
        raise KdsearchError(
            f"study {name!r} was not created by kdsearch (no stored spec); remove it with "
            f"`kdsearch study delete {name}` or give another study"
        )
    return StudySpec.model_validate(stored)
