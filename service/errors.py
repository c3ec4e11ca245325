"""User-facing errors: the CLI prints their message and exits 2, without a traceback."""

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
