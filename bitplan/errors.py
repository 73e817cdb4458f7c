"""One error family for every user-facing failure.

The CLI prints ``error: <message>`` (and ``hint: <hint>``) and exits 2; the API
will map the same errors to a 4xx JSON body. Tracebacks are for bugs only.
"""

from __future__ import annotations


class BitplanError(Exception):
    """A failure the user can act on: ``message`` says what, ``hint`` what to do."""

    code = "bad_input"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.one_line()

    def one_line(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UnsafeModelError(BitplanError):
    """The upload would need unpickling arbitrary objects; refused unread."""

    code = "unsafe_model"


class ModelFormatError(BitplanError):
    code = "bad_model"


class DataError(BitplanError):
    code = "bad_data"


class BudgetError(BitplanError):
    code = "bad_budget"


class InfeasibleError(BitplanError):
    """No plan satisfies the budgets; ``minimums`` names the smallest achievable values."""

    code = "infeasible"

    def __init__(self, message: str, hint: str | None = None, minimums: dict | None = None):
        super().__init__(message, hint)
        self.minimums = minimums or {}
