"""Sealing artifacts into the fleet: the keystore, the policy, and what never appears in clear."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from provisioning.errors import KeystoreError
from provisioning.home import FleetHome
from provisioning.keystore import Keystore, ReleasePolicy
from provisioning.seal import inspect_artifact, seal_artifact
from strongroom import artifact
from strongroom.artifact import SignedManifest
from strongroom.errors import FormatError, InputError, SignatureError, TruncatedError
from strongroom.policy import ArtifactReference

CHUNK = 64
MARKER = b"PROPRIETARY-WEIGHTS-"
MEASUREMENT = "ab" * 32


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(MARKER * 40 + os.urandom(100))  # several chunks at CHUNK bytes each
    return path


def seal(
    home: FleetHome, src: Path, out: Path, name: str = "model", version: int = 1, **kwargs: object
) -> SignedManifest:
    kwargs.setdefault("chunk_size", CHUNK)
    return seal_artifact(home, src, out, name=name, version=version, kind="model", **kwargs)  # type: ignore[arg-type]


def keystore_files(home: FleetHome) -> list[Path]:
    return sorted((home.keystore_dir / "keys").iterdir())


def open_with_keystore(home: FleetHome, path: Path) -> bytes:
    """Open an artifact the way the key broker and a device together would."""
    with path.open("rb") as f:
        signed = artifact.read_manifest(f)
        manifest = signed.verify(home.verify_key("artifact"))
        _, data_key = Keystore(home.keystore_dir).unwrap(manifest.key_id)
        try:
            return b"".join(bytes(v) for v in artifact.open_stream(f, signed, data_key))
        finally:
            data_key[:] = bytes(len(data_key))


def test_sealed_artifact_opens_with_the_data_key_from_the_keystore(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.art"
    signed = seal(fleet_home, model_file, out, version=2)

    entry = Keystore(fleet_home.keystore_dir).entry(signed.manifest.key_id)
    assert (entry.name, entry.version, entry.kind) == ("model", 2, "model")
    assert entry.sha256 == signed.manifest.sha256
    assert open_with_keystore(fleet_home, out) == model_file.read_bytes()


def test_the_data_key_is_stored_only_wrapped(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.art"
    signed = seal(fleet_home, model_file, out)
    _, data_key = Keystore(fleet_home.keystore_dir).unwrap(signed.manifest.key_id)
    forms = [bytes(data_key), bytes(data_key).hex().encode(), base64.b64encode(bytes(data_key))]

    places = [*keystore_files(fleet_home), out, fleet_home.policy_path]
    assert [p.name for p in places if any(form in p.read_bytes() for form in forms)] == []
    assert len(keystore_files(fleet_home)) == 1


def test_the_artifact_file_does_not_contain_the_plaintext(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.art"
    seal(fleet_home, model_file, out)

    sealed = out.read_bytes()
    assert MARKER not in sealed
    assert model_file.read_bytes()[-100:-84] not in sealed


def test_the_release_policy_is_recorded_with_the_key(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    signed = seal(
        fleet_home,
        model_file,
        tmp_path / "model.art",
        min_svn=4,
        min_firmware="2.3.0",
        measurements=(MEASUREMENT,),
    )

    entry = Keystore(fleet_home.keystore_dir).entry(signed.manifest.key_id)
    assert entry.release == ReleasePolicy(
        signers=(fleet_home.verify_key("enclave").fingerprint,),
        measurements=(MEASUREMENT,),
        min_svn=4,
        min_firmware="2.3.0",
    )
    assert signed.manifest.min_svn == 4


def test_sealing_registers_the_artifact_and_a_floor_for_a_new_name(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    before = fleet_home.load_policy()
    first = seal(fleet_home, model_file, tmp_path / "v3.art", version=3)
    after_first = fleet_home.load_policy()
    second = seal(fleet_home, model_file, tmp_path / "v5.art", version=5)
    after_second = fleet_home.load_policy()

    assert after_first.version == before.version + 1
    assert after_first.artifact_floors == {"model": 3}
    assert after_first.artifact_references == (
        ArtifactReference("model", 3, first.manifest.sha256, "model"),
    )
    # A name already known keeps its floor: raising it is an operator's decision.
    assert after_second.version == before.version + 2
    assert after_second.artifact_floors == {"model": 3}
    assert after_second.artifact_references[1] == ArtifactReference(
        "model", 5, second.manifest.sha256, "model"
    )


def test_policy_edits_by_sealing_keep_the_operators_comments(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    text = fleet_home.policy_path.read_text()
    fleet_home.policy_path.write_text(text.replace("[keys]", "# ask ops before changing\n[keys]"))

    seal(fleet_home, model_file, tmp_path / "model.art", name="model.v2")

    edited = fleet_home.policy_path.read_text()
    assert "# ask ops before changing" in edited
    assert "# devices below this firmware fail appraisal" in edited
    assert fleet_home.load_policy().artifact_floors == {"model.v2": 1}


def test_a_failed_policy_update_leaves_no_artifact_and_no_key(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    fleet_home.policy_path.write_text("version = [unterminated")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    with pytest.raises(FormatError, match="not valid TOML"):
        seal(fleet_home, model_file, out_dir / "model.art")
    assert list(out_dir.iterdir()) == []
    assert keystore_files(fleet_home) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Model"}, "invalid artifact name"),
        ({"name": "../model"}, "invalid artifact name"),
        ({"version": 0}, "version"),
        ({"min_firmware": "2.0"}, "invalid firmware"),
        ({"measurements": ("AB" * 32,)}, "invalid measurement"),
        ({"measurements": ("ab" * 31,)}, "invalid measurement"),
        ({"chunk_size": 8}, "chunk size"),
    ],
)
def test_bad_seal_arguments_are_refused_and_nothing_is_written(
    fleet_home: FleetHome,
    model_file: Path,
    tmp_path: Path,
    change: dict[str, object],
    message: str,
) -> None:
    policy_before = fleet_home.policy_path.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    with pytest.raises(InputError, match=message):
        seal(fleet_home, model_file, out_dir / "model.art", **change)
    assert list(out_dir.iterdir()) == []
    assert keystore_files(fleet_home) == []
    assert fleet_home.policy_path.read_bytes() == policy_before


def test_an_invalid_kind_is_refused(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="invalid kind"):
        seal_artifact(
            fleet_home,
            model_file,
            tmp_path / "a.art",
            name="m",
            version=1,
            kind="firmware",  # type: ignore[arg-type]
        )
    assert keystore_files(fleet_home) == []


def test_sealing_refuses_a_missing_source_and_an_existing_output(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match="not found"):
        seal(fleet_home, tmp_path / "missing.bin", tmp_path / "a.art")
    existing = tmp_path / "existing.art"
    existing.write_bytes(b"older artifact")
    with pytest.raises(InputError, match="already exists"):
        seal(fleet_home, model_file, existing)

    assert existing.read_bytes() == b"older artifact"
    assert keystore_files(fleet_home) == []


# --- inspect -------------------------------------------------------------------------------------


def test_inspect_shows_the_manifest_but_no_key_material(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.art"
    signed = seal(fleet_home, model_file, out)
    _, data_key = Keystore(fleet_home.keystore_dir).unwrap(signed.manifest.key_id)

    report = inspect_artifact(out, fleet_home.verify_key("artifact"))
    text = json.dumps(report)

    assert report["manifest"] == signed.manifest.to_json_dict()
    assert report["signature"] == "valid"
    assert report["signer_trusted"] is True
    assert report["signer"] == fleet_home.verify_key("artifact").fingerprint
    assert bytes(data_key).hex() not in text
    assert base64.b64encode(bytes(data_key)).decode() not in text
    assert (fleet_home.keystore_dir / "kek").read_bytes().hex() not in text


def test_inspect_without_a_trusted_key_does_not_claim_trust(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.art"
    seal(fleet_home, model_file, out)
    assert inspect_artifact(out)["signer_trusted"] is None


def test_inspect_detects_a_truncated_body(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.art"
    seal(fleet_home, model_file, out)
    out.write_bytes(out.read_bytes()[:-1])

    with pytest.raises(TruncatedError):
        inspect_artifact(out, fleet_home.verify_key("artifact"))


def test_inspect_detects_trailing_data(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.art"
    seal(fleet_home, model_file, out)
    out.write_bytes(out.read_bytes() + b"\x00")

    with pytest.raises(FormatError, match="after its final chunk"):
        inspect_artifact(out, fleet_home.verify_key("artifact"))


def test_inspect_refuses_an_artifact_of_another_fleet(
    fleet_home: FleetHome, other_fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.art"
    seal(other_fleet_home, model_file, out)

    with pytest.raises(SignatureError):
        inspect_artifact(out, fleet_home.verify_key("artifact"))


# --- keystore integrity --------------------------------------------------------------------------


def _other_hex_digit(c: str) -> str:
    return "1" if c == "0" else "0"


def _edit_wrapped(doc: dict[str, dict[str, str]], how: str) -> None:
    wrapped = doc["wrapped"]
    ct, nonce = wrapped["ciphertext"], wrapped["nonce"]
    if how == "ciphertext digit":
        wrapped["ciphertext"] = ct[:10] + _other_hex_digit(ct[10]) + ct[11:]
    elif how == "tag digit":
        wrapped["ciphertext"] = ct[:-1] + _other_hex_digit(ct[-1])
    elif how == "nonce digit":
        wrapped["nonce"] = _other_hex_digit(nonce[0]) + nonce[1:]
    elif how == "shortened":
        wrapped["ciphertext"] = ct[:-2]
    elif how == "emptied":
        wrapped["ciphertext"] = ""
    elif how == "not hex":
        wrapped["ciphertext"] = "zz" + ct[2:]
    elif how == "odd length":
        wrapped["ciphertext"] = ct[:-1]
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "ciphertext digit",
        "tag digit",
        "nonce digit",
        "shortened",
        "emptied",
        "not hex",
        "odd length",
    ],
)
def test_a_keystore_entry_with_an_edited_wrapped_key_fails_to_unwrap(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path, how: str
) -> None:
    signed = seal(fleet_home, model_file, tmp_path / "model.art")
    (entry_file,) = keystore_files(fleet_home)
    doc = json.loads(entry_file.read_bytes())
    _edit_wrapped(doc, how)
    entry_file.write_text(json.dumps(doc))

    with pytest.raises(KeystoreError):
        Keystore(fleet_home.keystore_dir).unwrap(signed.manifest.key_id)


def test_a_wrapped_key_moved_to_another_entry_fails_to_unwrap(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    first = seal(fleet_home, model_file, tmp_path / "a.art", name="alpha")
    second = seal(fleet_home, model_file, tmp_path / "b.art", name="beta")
    keys = fleet_home.keystore_dir / "keys"
    first_doc = json.loads((keys / f"{first.manifest.key_id}.json").read_bytes())
    second_path = keys / f"{second.manifest.key_id}.json"
    second_doc = json.loads(second_path.read_bytes())
    second_doc["wrapped"] = first_doc["wrapped"]
    second_path.write_text(json.dumps(second_doc))

    with pytest.raises(KeystoreError):
        Keystore(fleet_home.keystore_dir).unwrap(second.manifest.key_id)


def test_a_keystore_entry_relabelled_to_another_artifact_fails_to_unwrap(
    fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    signed = seal(fleet_home, model_file, tmp_path / "model.art")
    (entry_file,) = keystore_files(fleet_home)
    doc = json.loads(entry_file.read_bytes())
    doc["artifact"]["version"] = 99
    entry_file.write_text(json.dumps(doc))

    with pytest.raises(KeystoreError):
        Keystore(fleet_home.keystore_dir).unwrap(signed.manifest.key_id)


def test_a_keystore_entry_copied_to_another_fleet_fails_to_unwrap(
    fleet_home: FleetHome, other_fleet_home: FleetHome, model_file: Path, tmp_path: Path
) -> None:
    signed = seal(fleet_home, model_file, tmp_path / "model.art")
    (entry_file,) = keystore_files(fleet_home)
    shutil.copy(entry_file, other_fleet_home.keystore_dir / "keys" / entry_file.name)

    with pytest.raises(KeystoreError):
        Keystore(other_fleet_home.keystore_dir).unwrap(signed.manifest.key_id)
