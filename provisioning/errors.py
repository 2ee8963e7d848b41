"""Errors of the provisioning package."""

from __future__ import annotations

from strongroom.errors import InputError, IntegrityError


class NotAFleetHomeError(InputError):
    hint = "create one with `strongroom fleet init HOME` or pass the right --home"


class AlreadyEnrolledError(InputError):
    hint = "pass --force to re-enroll it (its old keys stop working)"


class KeystoreError(IntegrityError):
    hint = "the keystore entry is corrupt or was written under another key-encryption key"
