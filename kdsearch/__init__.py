"""kdsearch: hyperparameter search for confidence-preserving knowledge distillation.

The Python API (``kdsearch.api``): ``create_study``, ``load_study`` and the ``Study``
handle; the command line is ``kdsearch`` (``kdsearch.cli``). Importing kdsearch does not
import torch; running a worker does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Run from a source checkout's root (`python -m pytest`, the bench/ scripts), this folder
# is found before the installed package; the study and compute sides are then the
# checkout's top-level service/ and workers/ folders, which pyproject.toml installs as
# kdsearch.service and kdsearch.workers. (The installed package holds them itself.)
_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "service").is_dir() and (
    (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "service" / "__init__.py").is_file()
):
    __path__.append(str(_CHECKOUT))

__all__ = ["Study", "__version__", "create_study", "load_study"]

if TYPE_CHECKING:
    from kdsearch.api import Study, create_study, load_study


def __getattr__(name: str) -> Any:
    # Lazy: `import kdsearch` stays cheap for the CLI, which reads only __version__.
    if name in ("Study", "create_study", "load_study"):
        from kdsearch import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdsearch' has no attribute {name!r}")
