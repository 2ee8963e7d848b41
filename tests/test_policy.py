"""The fleet policy file: strict parsing, and edits that keep what the operator wrote."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from provisioning.policy_file import add_artifact_reference, add_enclave_reference, initial_policy
from strongroom.errors import FormatError
from strongroom.policy import ArtifactReference, EnclaveReference, FleetPolicy, parse_policy

SIGNER = "5e" * 32
BASE = initial_policy(SIGNER)
MRENCLAVE = "0123456789abcdef" * 4
SHA256 = "fe" * 32


def with_line(section: str, line: str, text: str = BASE) -> str:
    """BASE with `line` added at the top of `[section]` (or of the document for "")."""
    if not section:
        return f"{line}\n{text}"
    header = f"[{section}]\n"
    assert header in text
    return text.replace(header, f"{header}{line}\n", 1)


def replaced(old: str, new: str, text: str = BASE) -> str:
    assert old in text
    return text.replace(old, new, 1)


def test_initial_policy_parses_to_the_documented_defaults() -> None:
    assert parse_policy(BASE) == FleetPolicy(allowed_signers=(SIGNER,))


def test_initial_policy_refuses_a_malformed_signer() -> None:
    with pytest.raises(FormatError, match="allowed_signers"):
        initial_policy("not-a-fingerprint")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (with_line("", "colour = 'blue'"), "colour"),
        (with_line("platform", "allow_debg = true"), "platform.allow_debg"),
        (with_line("enclave", "min_svm = 2"), "enclave.min_svm"),
        (with_line("artifacts", "flors = {}"), "artifacts.flors"),
        (with_line("attestation", "interval = 5"), "attestation.interval"),
        (with_line("keys", "lease = 10"), "keys.lease"),
        (BASE + "\n[extras]\nx = 1\n", "extras"),
        (
            BASE + f'\n[[enclave.reference]]\nmrenclave = "{MRENCLAVE}"\nsvn = 1\nsigner = "x"\n',
            "enclave.reference[0].signer",
        ),
        (
            BASE
            + f'\n[[artifacts.reference]]\nname = "m"\nversion = 1\nsha256 = "{SHA256}"\n'
            + 'kind = "model"\nsize = 3\n',
            "artifacts.reference[0].size",
        ),
    ],
)
def test_unknown_keys_are_rejected(text: str, key: str) -> None:
    with pytest.raises(FormatError, match=f"unknown key {re.escape(key)}$"):
        parse_policy(text)


@pytest.mark.parametrize(
    "text",
    [
        replaced("version = 1", 'version = "1"'),
        replaced("version = 1", "version = true"),
        replaced("version = 1", "version = 1.0"),
        replaced("allow_debug = false", 'allow_debug = "no"'),
        replaced("require_secure_boot = true", "require_secure_boot = 1"),
        replaced("min_svn = 1", "min_svn = 1.5"),
        replaced(f'allowed_signers = ["{SIGNER}"]', f'allowed_signers = "{SIGNER}"'),
        replaced(f'allowed_signers = ["{SIGNER}"]', "allowed_signers = [1]"),
        replaced(f'allowed_signers = ["{SIGNER}"]', f'allowed_signers = ["{SIGNER.upper()}"]'),
        replaced("floors = {}", 'floors = {model = "3"}'),
        replaced("floors = {}", "floors = 3"),
        replaced("floors = {}", 'floors = {"Bad Name" = 3}'),
        replaced("lease_s = 3600", "lease_s = false"),
        replaced("interval_s = 300", 'interval_s = "300"'),
        replaced('smt = "allow"', "smt = true"),
        replaced('smt = "allow"', 'smt = "sometimes"'),
        BASE + f'\n[enclave.reference]\nmrenclave = "{MRENCLAVE}"\n',
        BASE + f'\n[[enclave.reference]]\nmrenclave = "{MRENCLAVE.upper()}"\nsvn = 1\n',
        BASE + "\n[[enclave.reference]]\nsvn = 1\n",
        BASE + f'\n[[enclave.reference]]\nmrenclave = "{MRENCLAVE}"\nsvn = 0\n',
        BASE + f'\n[[artifacts.reference]]\nname = "m"\nversion = 1\nsha256 = "{SHA256}"\n'
        'kind = "firmware"\n',
        "platform = 3\n",
    ],
)
def test_wrong_types_and_values_are_rejected(text: str) -> None:
    with pytest.raises(FormatError, match=r"^policy: "):
        parse_policy(text)


@pytest.mark.parametrize(
    "firmware", ["", "1", "1.0", "1.0.0.0", "1.0.x", "v1.0.0", "1.-1.0", "1.0.0 ", "1234567.0.0"]
)
def test_bad_minimum_firmware_is_rejected(firmware: str) -> None:
    with pytest.raises(FormatError, match="min_firmware"):
        parse_policy(replaced('min_firmware = "1.0.0"', f'min_firmware = "{firmware}"'))


def test_a_firmware_version_with_non_ascii_digits_is_rejected_as_a_format_error() -> None:
    # "²" is a digit to str.isdigit() but not to int(): it must be refused, not crash the parser.
    with pytest.raises(FormatError, match="min_firmware"):
        parse_policy(replaced('min_firmware = "1.0.0"', 'min_firmware = "².0.0"'))


@pytest.mark.parametrize(("lease", "margin"), [(3600, 3600), (600, 601), (10, 30 * 86400)])
def test_a_renew_margin_not_shorter_than_the_lease_is_rejected(lease: int, margin: int) -> None:
    text = replaced("lease_s = 3600", f"lease_s = {lease}")
    text = replaced("renew_margin_s = 300", f"renew_margin_s = {margin}", text)
    with pytest.raises(FormatError, match="renew_margin_s must be shorter"):
        parse_policy(text)


def test_a_renew_margin_just_shorter_than_the_lease_is_accepted() -> None:
    text = replaced("lease_s = 3600", "lease_s = 600")
    text = replaced("renew_margin_s = 300", "renew_margin_s = 599", text)
    policy = parse_policy(text)
    assert (policy.lease_s, policy.renew_margin_s) == (600, 599)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("nonce_ttl_s = 60", "nonce_ttl_s = 0"),
        ("interval_s = 300", "interval_s = 86401"),
        ("lease_s = 3600", "lease_s = 9"),
        ("offline_grace_s = 86400", "offline_grace_s = -1"),
        ("version = 1", "version = 0"),
        ("min_svn = 1", "min_svn = 0"),
    ],
)
def test_values_out_of_range_are_rejected(old: str, new: str) -> None:
    with pytest.raises(FormatError, match="must be between"):
        parse_policy(replaced(old, new))


def test_invalid_toml_is_a_format_error() -> None:
    with pytest.raises(FormatError, match="not valid TOML"):
        parse_policy("version = \n")


# --- edits ---------------------------------------------------------------------------------------


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(
        replaced("[keys]", "# operator: lease reviewed by security, do not raise\n[keys]")
    )
    return path


def comment_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "#" in line]


def test_edits_keep_comments_and_bump_the_version(policy_path: Path) -> None:
    original = policy_path.read_text()

    assert add_enclave_reference(policy_path, EnclaveReference(MRENCLAVE, svn=2))
    add_artifact_reference(policy_path, ArtifactReference("model", 4, SHA256, "model"))

    edited = policy_path.read_text()
    assert comment_lines(edited) == comment_lines(original)
    policy = parse_policy(edited)
    assert policy.version == 3
    assert policy.enclave_references == (EnclaveReference(MRENCLAVE, svn=2),)
    assert policy.artifact_references == (ArtifactReference("model", 4, SHA256, "model"),)
    assert policy.artifact_floors == {"model": 4}
    # Nothing else moved: the operator's settings are untouched.
    assert policy.lease_s == 3600
    assert policy.allowed_signers == (SIGNER,)


def test_adding_a_known_enclave_reference_changes_nothing(policy_path: Path) -> None:
    ref = EnclaveReference(MRENCLAVE, svn=2)
    assert add_enclave_reference(policy_path, ref)
    once = policy_path.read_text()

    assert not add_enclave_reference(policy_path, ref)
    assert policy_path.read_text() == once


def test_an_edit_that_would_make_the_policy_invalid_is_not_written(policy_path: Path) -> None:
    before = policy_path.read_bytes()
    with pytest.raises(FormatError):
        add_artifact_reference(policy_path, ArtifactReference("Not A Name", 1, SHA256, "model"))
    assert policy_path.read_bytes() == before


def test_a_policy_file_that_is_not_utf8_is_a_format_error(tmp_path: Path) -> None:
    from provisioning.home import init_home  # noqa: PLC0415 - the fleet side

    home = init_home(tmp_path / "home")
    home.policy_path.write_bytes(b"version = 1\n\xff\xfe")
    with pytest.raises(FormatError, match="not UTF-8"):
        home.load_policy()
