"""Development-only key source: wraps data keys from a local fleet home to a *debug* enclave.

This stands in for the fleet's key broker until remote attestation is in place, for local
development and tests. It cannot serve a production configuration: the host refuses debug images
in production, and this function refuses any enclave whose report is not a debug build, so keys
obtained this way only ever reach enclaves that no production policy trusts.
"""

from __future__ import annotations

import time
from pathlib import Path

from agent.errors import EnclaveError
from agent.host import EnclaveInfo, WrappedKey, manifest_of
from provisioning.home import open_home
from provisioning.keystore import Keystore
from strongroom import keywrap

DEV_AAD_PREFIX = b"strongroom/dev-key/v1|"
DEV_LEASE_S = 30 * 86400


def dev_wrapped_key(home_path: Path, enclave: EnclaveInfo, artifact_path: Path) -> WrappedKey:
    if not enclave.report.identity.debug:
        raise EnclaveError(
            "development keys are only given to debug enclaves",
            hint="use the fleet's key broker (remote attestation) for production enclaves",
        )
    manifest = manifest_of(artifact_path)
    home = open_home(home_path)
    _entry, data_key = Keystore(home.keystore_dir).unwrap(manifest.key_id)
    try:
        aad = DEV_AAD_PREFIX + enclave.public_key
        lease = keywrap.Lease(time.time() + DEV_LEASE_S, 0)
        wrapped = keywrap.wrap_key(
            enclave.public_key, data_key, lease, key_id=manifest.key_id, aad=aad
        )
    finally:
        data_key[:] = bytes(len(data_key))
    return WrappedKey(wrapped, aad)
