"""Error types that map onto the CLI's exit codes."""


class SpaError(Exception):
    """Bad input or bad option: one line for the user, exit code 2."""

    exit_code = 2


class DataPassesUnavailable(SpaError):
    """The data passes (scoring on data, reconstruction) cannot run this model (`reason`); the default mode then
    prunes as --fast does, an explicit data option is refused with this line."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}: add --fast (magnitude ranking, no data pass, no reconstruction)")
        self.reason = reason


class VerificationError(Exception):
    """The pruned model does not match its reference: exit code 1, nothing written."""

    exit_code = 1


class FidelityError(Exception):
    """--max-drop: even the smallest cut tried loses more fidelity than allowed: exit code 1, nothing written."""

    exit_code = 1


def one_line(text, limit: int | None = None) -> str:
    """A message (or an exception) folded onto one line, so an error stays the single stderr line the CLI
    promises; `limit` cuts very long library messages."""
    folded = " ".join(str(text).split())
    return folded if limit is None else folded[:limit]
