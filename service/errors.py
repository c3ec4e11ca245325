"""User-facing errors and the exit codes of every command.

The CLI prints a ``KdsearchError``'s message as ``kdsearch: error: ...`` and exits with
its ``exit_code``, without a traceback. Exit codes, the same for every command:

====  ==========================================================================
0     done
1     trials kept failing (a failure streak stopped the worker)
2     bad input or usage: a spec, a file, an option, an unknown study
3     the study storage (database) is unreachable
4     the artifact store or a local folder kdsearch writes to is unusable
====  ==========================================================================
"""

from __future__ import annotations


class KdsearchError(Exception):
    """A problem the user can fix (bad input, unknown study, unreachable storage).

    The message names the value received, the rule it breaks and how to fix it.
    """

    exit_code = 2


class SpecError(KdsearchError):
    """Every problem found in one study spec, reported together."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun} in the study spec:\n{lines}")


class StorageUnavailable(KdsearchError):
    """The study storage cannot be reached (or stayed unreachable past the worker's limit)."""

    exit_code = 3


class InfrastructureError(KdsearchError):
    """The artifact store, the asset cache or the local disk is unusable. Not the trial's
    fault: the worker stops without charging the trial a retry."""

    exit_code = 4


class FailureStreak(KdsearchError):
    """Trials kept failing: the worker stops rather than burn the budget on failures."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (of its database cause, for SQLAlchemy's
    wrapped errors), or its type name when it has none: safe to put in one-line messages."""
    text = str(getattr(exc, "orig", None) or exc.__cause__ or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
