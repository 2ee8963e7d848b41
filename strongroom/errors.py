"""The root of every error Strongroom raises, and the errors of the shared formats.

Errors are split by who is at fault, as in python-tuf: bad input from the user (`InputError`),
bad or hostile data from a peer or a file (`IntegrityError` and its kin), and a failed
environment (`EnvironmentFault`). Every error carries a one-line hint for what to do next;
only the CLI turns errors into messages and exit codes. Messages never contain secrets.
"""

from __future__ import annotations


class StrongroomError(Exception):
    """Root of all Strongroom errors."""

    hint = "see the message above"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def diagnostics(self) -> str:
        """One actionable line: what went wrong and what to do next."""
        return f"{self}; {self.hint}"


class InputError(StrongroomError):
    """The caller gave a bad argument: a malformed id, a missing file, an existing output."""

    hint = "check the command's arguments"


class EnvironmentFault(StrongroomError):
    """The environment failed: a missing program, a full disk, a permission the OS refused."""

    hint = "check the machine's set-up"


class IntegrityError(StrongroomError):
    """Data failed a format, signature or authentication check: corrupt, foreign or tampered."""

    hint = "the data is corrupt, tampered with or not what it claims to be; obtain a fresh copy"


class FormatError(IntegrityError):
    """The bytes are not in the expected format (wrong magic, bad lengths, bad fields)."""


class SignatureError(IntegrityError):
    """A signature does not verify under the expected key."""

    hint = "the data was not signed by the expected key; check that it comes from this fleet"


class WrongKeyError(IntegrityError):
    """A key does not match the data it is meant to open."""

    hint = "the key does not belong to this data; check which artifact and keystore you use"


class TruncatedError(IntegrityError):
    """A stream ended before its authenticated end."""

    hint = "the file is incomplete; copy it again"
