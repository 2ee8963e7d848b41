"""Make the fuzzing corpus (tests/corpus/<target>/*.bin) from real messages: every seed is made by
the project's own encoders and signers, with the fixed test keys of `fuzz.targets`, and parses.

    .venv/bin/python -m fuzz.make_corpus

Run it again after a format changes (and commit the result); the seeds it writes replace the
old ones of the same names. Artifacts and HPKE-wrapped keys use fresh randomness, so their bytes
differ between runs; everything else is the same every time.
"""

from __future__ import annotations

import io
import sys

import tomlkit
from cryptography.hazmat.primitives.asymmetric import x25519

from agent import channel
from fuzz import targets
from fuzz.targets import ARTIFACT_SIGNER, DATA_KEY, DEVICE_ID, DEVICE_KEY, NOW, VERIFIER_KEY
from provisioning import policy_file
from strongroom import artifact, commands, cose, ear, evidence, messages
from strongroom.evidence import ArtifactClaim, Evidence
from strongroom.image import EnclaveIdentity
from strongroom.keywrap import Lease, wrap_key
from strongroom.report import key_binding

IAT = int(NOW) - 60
ENCLAVE_PRIVATE = x25519.X25519PrivateKey.from_private_bytes(bytes(range(32)))
ENCLAVE_KEY = ENCLAVE_PRIVATE.public_key().public_bytes_raw()
IDENTITY = EnclaveIdentity("c1" * 32, ARTIFACT_SIGNER.verify_key.fingerprint, 1, 3, False)


def _evidence(nonce: bytes, seq: int, **changes: object) -> Evidence:
    fields: dict[str, object] = {
        "device_id": DEVICE_ID,
        "nonce": nonce,
        "ueid": evidence.ueid_for(DEVICE_KEY.verify_key),
        "iat": IAT,
        "seq": seq,
        "platform_debug": False,
        "firmware": "1.4.2",
        "secure_boot": True,
        "smt": False,
        "enclave": IDENTITY,
        "artifacts": (ArtifactClaim("vendor", 1, "f4" * 32), ArtifactClaim("model", 2, "e3" * 32)),
        "local_attestation": "passed",
        "enclave_key": ENCLAVE_KEY,
        "key_binding": key_binding(ENCLAVE_KEY, nonce),
    }
    fields.update(changes)
    return Evidence(**fields)  # type: ignore[arg-type]


def _tokens() -> dict[str, bytes]:
    return {
        "fresh": evidence.sign_evidence(_evidence(bytes(range(32)), 7), DEVICE_KEY),
        "periodic": evidence.sign_evidence(
            _evidence(b"\x5a" * 8, 2**40, artifacts=(), smt=None), DEVICE_KEY
        ),
        "debug": evidence.sign_evidence(
            _evidence(
                bytes(64),
                1,
                platform_debug=True,
                secure_boot=False,
                smt=True,
                enclave=EnclaveIdentity("d2" * 32, "5a" * 32, 0, 1, True),
            ),
            DEVICE_KEY,
        ),
    }


def _results() -> dict[str, bytes]:
    affirming = ear.AttestationResult(
        device_id=DEVICE_ID,
        status="affirming",
        vector={k: 2 for k in ear.VECTOR_KEYS[:3]},
        reasons=(),
        policy_id="policy:v4",
        iat=IAT,
        details={
            "firmware": "1.4.2",
            "svn": 3,
            "mrenclave": "c1" * 32,
            "artifacts": {"vendor": 1, "model": 2},
            "seq": 7,
            "freshness": "fresh",
        },
    )
    bad = ear.AttestationResult(
        device_id=DEVICE_ID,
        status="contraindicated",
        vector={"executables": 96, "hardware": 33},
        reasons=("MRSIGNER not allowed", "artifact model v1 below floor 2"),
        policy_id="policy:v4",
        iat=IAT,
        details={"freshness": "periodic", "seq": 2**40},
    )
    stale = ear.AttestationResult(
        DEVICE_ID, "none", {}, ("stale: no evidence for more than 900 s",), "policy:v4", IAT
    )
    return {
        n: ear.sign_result(r, VERIFIER_KEY)
        for n, r in (("affirming", affirming), ("contraindicated", bad), ("stale", stale))
    }


def _artifacts() -> dict[str, bytes]:
    out = {}
    for name, size, chunk in (("empty", 0, 16), ("one-chunk", 10, 64), ("chunks", 100, 16)):
        dst = io.BytesIO()
        artifact.seal_stream(
            io.BytesIO(bytes(range(size))),
            dst,
            name="model",
            version=2,
            kind="model",
            data_key=DATA_KEY,
            key_id="k" + name.replace("-", ""),
            signing_key=ARTIFACT_SIGNER,
            chunk_size=chunk,
        )
        out[name] = dst.getvalue()
    return out


def _channel_messages(token: bytes) -> dict[str, channel.Message]:
    return {
        "quote": {"op": "quote", "name": "evidence-seq", "artifacts": [["model", 2, "e3" * 32]]},
        "evidence": {"op": "evidence", "token": token},
        "counter": {"op": "counter_advance", "name": "seal:model", "value": 3},
        "run": {"op": "run", "timeout": 5.0, "input": {"x": [1, 2.5, None, True, "y"]}},
        "launch": {"op": "launch", "show_stderr": False},
    }


def _policies() -> dict[str, str]:
    initial = policy_file.initial_policy(ARTIFACT_SIGNER.verify_key.fingerprint)

    def references(doc: tomlkit.TOMLDocument) -> None:
        policy_file._append_row(doc, "enclave", {"mrenclave": "c1" * 32, "svn": 3, "product_id": 1})
        policy_file._append_row(
            doc, "artifacts", {"name": "model", "version": 2, "sha256": "e3" * 32, "kind": "model"}
        )
        artifacts = doc["artifacts"]
        assert isinstance(artifacts, tomlkit.items.Table)  # noqa: S101 - made just above
        artifacts["floors"] = {"model": 2}

    def strict(doc: tomlkit.TOMLDocument) -> None:
        platform = doc["platform"]
        assert isinstance(platform, tomlkit.items.Table)  # noqa: S101 - in the template
        platform["smt"] = "deny"
        platform["min_firmware"] = "2.0.10"

    edited = policy_file.edited(initial, references)
    return {"initial": initial, "references": edited, "strict": policy_file.edited(edited, strict)}


def seeds() -> dict[str, dict[str, bytes]]:
    """Every target's seeds, by name."""
    tokens = _tokens()
    results = _results()
    command = commands.Command(
        "revoke", DEVICE_ID, "contraindicated: MRSIGNER", NOW - 5, bytes(range(16))
    )
    lease = Lease(NOW + 3600, 86400)
    aad = b"strongroom/key-release/v1|" + DEVICE_ID.encode() + b"|" + bytes(range(32))
    wrapped = wrap_key(ENCLAVE_KEY, DATA_KEY, lease, key_id="kmodel", aad=aad)
    frames = _channel_messages(tokens["fresh"])
    policies = _policies()
    return {
        "evidence": tokens,
        "evidence_claims": {n: cose.parse(t, "evidence").payload for n, t in tokens.items()},
        "key_request": {
            "one": messages.KeyRequest(tokens["fresh"], ("kmodel",)).encode(),
            "several": messages.KeyRequest(tokens["debug"], ("kmodel", "kvendor", "K9")).encode(),
        },
        "key_response": {
            "released": messages.KeyResponse(
                bytes(range(32)),
                (messages.ReleasedKey("kmodel", wrapped, aad, lease.until, lease.until - 300),),
                (("kvendor", "attestation result is warning"),),
            ).encode(),
            "refused": messages.KeyResponse(b"\x01" * 8, (), (("k1", "unknown key"),)).encode(),
        },
        "challenge": {"one": messages.Challenge(bytes(range(32)), NOW + 60).encode()},
        "status": {
            "online": messages.Status("online", NOW).encode(),
            "will": messages.Status("offline", 0).encode(),
            "revoked": messages.Status("revoked", NOW, "wiped", bytes(range(16))).encode(),
            "report": messages.Status("online", NOW, "ignored a command: bad signature").encode(),
        },
        "alert": {
            "warning": messages.Alert(
                "warning", DEVICE_ID, "rejected evidence: replay", NOW
            ).encode()
        },
        "command": {"revoke": commands.sign_command(command, VERIFIER_KEY)},
        "command_body": {"revoke": command.body()},
        "result": results,
        "result_claims": {n: cose.parse(t, "result").payload for n, t in results.items()},
        "artifact": _artifacts(),
        "channel": {
            "session": b"".join(channel.encode(m) for m in frames.values()),
            **{n: channel.encode(m) for n, m in frames.items()},
        },
        "channel_payload": {n: channel.encode(m)[4:] for n, m in frames.items()},
        "policy": {n: t.encode() for n, t in policies.items()},
        "policy_edit": {n: t.encode() for n, t in policies.items()},
    }


def main() -> int:
    made = seeds()
    assert set(made) == set(targets.TARGETS), "every target has seeds"  # noqa: S101
    for target, named in made.items():
        folder = targets.CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in named.items():
            targets.TARGETS[target].run(data)  # a seed must parse: it is a real message
            (folder / f"{name}.bin").write_bytes(data)
        print(f"{target}: {len(named)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
