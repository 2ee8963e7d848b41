"""Errors of the on-device side (host, platform, enclave)."""

from __future__ import annotations

from strongroom.errors import EnvironmentFault, InputError, IntegrityError, StrongroomError


class EnclaveError(StrongroomError):
    """The enclave refused or failed a request."""

    hint = "see the reason; the enclave holds no plaintext after a failure"


class LaunchError(IntegrityError):
    """The platform refused to launch an image."""

    hint = "use an image built by `strongroom enclave build` for this fleet"


class LocalAttestationError(EnclaveError):
    """The enclave found its platform untrustworthy and refused to load anything."""

    hint = "the platform does not meet the enclave's policy (firmware, debug, SMT, secure boot)"


class EnclaveCrashedError(EnclaveError):
    """The enclave process died or stopped answering; it was stopped."""

    hint = "the enclave was stopped; start it again"


class InvokeError(EnclaveError):
    """Protected code raised, timed out or returned something that may not cross the boundary."""

    hint = "check the entry point and its input"


class BundleError(InputError):
    hint = "pass the bundle directory written by `strongroom device enroll`"


class PlatformFault(EnvironmentFault):
    hint = "the simulated platform could not start; check the bundle's platform directory"
