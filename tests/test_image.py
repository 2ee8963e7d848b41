"""Enclave images: reproducible builds, verification on load, and registration in the policy."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioning.build import build_enclave, collect_tree
from provisioning.home import FleetHome
from strongroom import canonical
from strongroom.errors import (
    FormatError,
    InputError,
    IntegrityError,
    SignatureError,
    TruncatedError,
)
from strongroom.image import (
    CONTENT_MAGIC,
    IMAGE_MAGIC,
    SIGSTRUCT_DOMAIN,
    build_image,
    canonical_content,
    load_image,
    measure,
)
from strongroom.policy import EnclaveReference, parse_policy
from strongroom.signing import SIGNATURE_SIZE, SigningKey

from .conftest import ENCLAVE_FILES, MakeEnclaveSource

SIGNER = SigningKey.generate()
ATTACKER = SigningKey.generate()
IMAGE, SIGSTRUCT = build_image(ENCLAVE_FILES, SIGNER, svn=3)
# fixed examples (no luck), no per-example deadline and no speed check (a loaded machine)
PROPERTY = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def sigstruct_span(image: bytes) -> tuple[int, int]:
    return 12, 12 + int.from_bytes(image[8:12], "big")


def content_start(image: bytes) -> int:
    return sigstruct_span(image)[1] + SIGNATURE_SIZE


def file_spans(image: bytes) -> dict[str, tuple[int, int]]:
    """Where each file's bytes lie inside the image, walking the documented layout."""
    pos = content_start(image) + len(CONTENT_MAGIC)
    count = int.from_bytes(image[pos : pos + 4], "big")
    pos += 4
    spans = {}
    for _ in range(count):
        plen = int.from_bytes(image[pos : pos + 2], "big")
        path = image[pos + 2 : pos + 2 + plen].decode()
        pos += 2 + plen
        size = int.from_bytes(image[pos : pos + 4], "big")
        spans[path] = (pos + 4, pos + 4 + size)
        pos += 4 + size
    return spans


def assemble(sigstruct_doc: dict[str, object], signer: SigningKey, content: bytes) -> bytes:
    body = canonical.dumps(sigstruct_doc)
    return (
        IMAGE_MAGIC
        + len(body).to_bytes(4, "big")
        + body
        + signer.sign(SIGSTRUCT_DOMAIN, body)
        + content
    )


def raw_content(entries: list[tuple[bytes, bytes]], trailer: bytes = b"") -> bytes:
    """Content bytes exactly as given, without the checks `canonical_content` makes."""
    out = [CONTENT_MAGIC, len(entries).to_bytes(4, "big")]
    for path, data in entries:
        out += [len(path).to_bytes(2, "big"), path, len(data).to_bytes(4, "big"), data]
    return b"".join(out) + trailer


def signed_image_of(content: bytes, signer: SigningKey = SIGNER) -> bytes:
    """An image correctly measured and signed over arbitrary content."""
    doc = SIGSTRUCT.to_json_dict()
    doc.update(
        mrenclave=measure(content),
        signer_key=signer.verify_key.raw.hex(),
        mrsigner=signer.verify_key.fingerprint,
    )
    return assemble(doc, signer, content)


# --- reproducibility -----------------------------------------------------------------------------


def test_building_the_same_files_twice_gives_identical_bytes() -> None:
    again, sigstruct = build_image(dict(reversed(ENCLAVE_FILES.items())), SIGNER, svn=3)
    assert again == IMAGE
    assert sigstruct == SIGSTRUCT


def test_build_ignores_creation_order_timestamps_modes_and_build_debris(
    make_enclave_source: MakeEnclaveSource,
) -> None:
    first = make_enclave_source("first", order=sorted(ENCLAVE_FILES))
    second = make_enclave_source("second", order=sorted(ENCLAVE_FILES, reverse=True))
    for i, rel in enumerate(sorted(ENCLAVE_FILES)):
        os.utime(first / rel, (1_000_000, 1_000_000))
        os.utime(second / rel, (2_000_000_000 + i, 2_000_000_000 + i))
        (first / rel).chmod(0o600)
        (second / rel).chmod(0o755)
    (second / "app" / "__pycache__").mkdir()
    (second / "app" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (second / "stale.pyc").write_bytes(b"\x00bytecode")
    (second / ".DS_Store").write_bytes(b"finder")
    (second / ".git").mkdir()
    (second / ".git" / "config").write_bytes(b"[core]")

    assert collect_tree(first) == collect_tree(second) == dict(ENCLAVE_FILES)
    first_image, _ = build_image(collect_tree(first), SIGNER, svn=3)
    second_image, _ = build_image(collect_tree(second), SIGNER, svn=3)
    assert first_image == second_image == IMAGE


def test_enclave_build_of_identical_trees_writes_identical_images(
    fleet_home: FleetHome, make_enclave_source: MakeEnclaveSource, tmp_path: Path
) -> None:
    first = make_enclave_source("first")
    second = make_enclave_source("second", order=sorted(ENCLAVE_FILES, reverse=True))
    (second / "main.py").chmod(0o700)

    sig_a = build_enclave(fleet_home, first, tmp_path / "a.img", svn=1)
    sig_b = build_enclave(fleet_home, second, tmp_path / "b.img", svn=1)

    assert (tmp_path / "a.img").read_bytes() == (tmp_path / "b.img").read_bytes()
    assert sig_a == sig_b


# --- loading verifies ----------------------------------------------------------------------------


def test_loaded_image_gives_back_its_files_and_measurements() -> None:
    loaded = load_image(IMAGE)

    assert loaded.files == dict(ENCLAVE_FILES)
    assert loaded.mrenclave == hashlib.sha256(IMAGE[content_start(IMAGE) :]).hexdigest()
    assert loaded.mrenclave == measure(canonical_content(ENCLAVE_FILES))
    assert loaded.mrsigner == hashlib.sha256(SIGNER.verify_key.raw).hexdigest()
    assert (loaded.sigstruct.svn, loaded.sigstruct.product_id, loaded.sigstruct.debug) == (
        3,
        1,
        False,
    )


@PROPERTY
@given(data=st.data())
def test_one_changed_byte_in_any_file_is_refused(data: st.DataObject) -> None:
    spans = file_spans(IMAGE)
    path = data.draw(st.sampled_from(sorted(p for p, (s, e) in spans.items() if e > s)))
    start, end = spans[path]
    position = data.draw(st.integers(start, end - 1))
    value = data.draw(st.integers(0, 255).filter(lambda v: v != IMAGE[position]))
    tampered = bytearray(IMAGE)
    tampered[position] = value

    with pytest.raises(IntegrityError, match="MRENCLAVE") as caught:
        load_image(bytes(tampered))
    assert type(caught.value) is IntegrityError


@PROPERTY
@given(data=st.data())
def test_any_bit_flip_in_the_content_is_refused(data: st.DataObject) -> None:
    position = data.draw(st.integers(content_start(IMAGE), len(IMAGE) - 1))
    tampered = bytearray(IMAGE)
    tampered[position] ^= 1 << data.draw(st.integers(0, 7))

    with pytest.raises(IntegrityError) as caught:
        load_image(bytes(tampered))
    assert type(caught.value) is IntegrityError


@PROPERTY
@given(data=st.data())
def test_any_bit_flip_in_the_sigstruct_is_refused(data: st.DataObject) -> None:
    start, end = sigstruct_span(IMAGE)
    position = data.draw(st.integers(start, end - 1))
    tampered = bytearray(IMAGE)
    tampered[position] ^= 1 << data.draw(st.integers(0, 7))

    with pytest.raises(IntegrityError) as caught:
        load_image(bytes(tampered))
    # Either the edited JSON no longer parses, or it parses and its signature fails.
    assert type(caught.value) in (FormatError, SignatureError)


@pytest.mark.parametrize("position", [0, SIGNATURE_SIZE // 2, SIGNATURE_SIZE - 1])
def test_a_flipped_signature_is_refused(position: int) -> None:
    tampered = bytearray(IMAGE)
    tampered[sigstruct_span(IMAGE)[1] + position] ^= 0x01
    with pytest.raises(SignatureError):
        load_image(bytes(tampered))


def _edited(**changes: object) -> bytes:
    """IMAGE with its sigstruct fields changed, the length fixed up and the signature kept."""
    start, end = sigstruct_span(IMAGE)
    doc = json.loads(IMAGE[start:end])
    doc.update(changes)
    body = canonical.dumps(doc)
    return IMAGE_MAGIC + len(body).to_bytes(4, "big") + body + IMAGE[end:]


def test_sigstruct_with_a_raised_svn_is_refused() -> None:
    with pytest.raises(SignatureError):
        load_image(_edited(svn=99))


def test_sigstruct_turned_into_a_debug_build_is_refused() -> None:
    with pytest.raises(SignatureError):
        load_image(_edited(debug=True))


def test_content_swapped_with_a_matching_mrenclave_is_refused() -> None:
    evil = canonical_content({**ENCLAVE_FILES, "main.py": b"import os; os.system('exfiltrate')"})
    start, end = sigstruct_span(IMAGE)
    doc = json.loads(IMAGE[start:end])
    doc["mrenclave"] = measure(evil)
    body = canonical.dumps(doc)
    tampered = (
        IMAGE_MAGIC + len(body).to_bytes(4, "big") + body + IMAGE[end : end + SIGNATURE_SIZE] + evil
    )
    with pytest.raises(SignatureError):
        load_image(tampered)


def test_sigstruct_whose_mrsigner_does_not_match_its_key_is_refused() -> None:
    with pytest.raises(FormatError, match="mrsigner"):
        load_image(_edited(signer_key=ATTACKER.verify_key.raw.hex()))


def test_sigstruct_with_an_edited_length_is_refused() -> None:
    tampered = bytearray(IMAGE)
    tampered[11] ^= 0x01
    with pytest.raises(FormatError):
        load_image(bytes(tampered))


def test_image_re_signed_by_another_key_loads_under_that_signers_identity() -> None:
    # The image format only proves who signed it; trusting the signer is the policy's job, so a
    # re-signed image must report the other MRSIGNER for the policy to refuse.
    resigned = signed_image_of(IMAGE[content_start(IMAGE) :], ATTACKER)
    loaded = load_image(resigned)

    assert loaded.mrenclave == SIGSTRUCT.mrenclave
    assert loaded.mrsigner == ATTACKER.verify_key.fingerprint != SIGSTRUCT.mrsigner


@pytest.mark.parametrize("cut", [0, 5, 11, 12, content_start(IMAGE) - 1])
def test_truncated_image_header_is_refused(cut: int) -> None:
    expected = FormatError if cut < 12 else TruncatedError
    with pytest.raises(IntegrityError) as caught:
        load_image(IMAGE[:cut])
    assert type(caught.value) is expected


# --- paths and canonical form --------------------------------------------------------------------

UNSAFE_PATHS = [
    "",
    "/etc/passwd",
    "../escape.py",
    "app/../../escape.py",
    "./main.py",
    "app//model.py",
    "app/",
    "app\\model.py",
    "nul\x00.py",
    "a" * 1025,
]


@pytest.mark.parametrize("path", UNSAFE_PATHS)
def test_unsafe_path_cannot_be_built_into_an_image(path: str) -> None:
    with pytest.raises(FormatError, match="unsafe path"):
        canonical_content({path: b"x", "main.py": b"print()"})


@pytest.mark.parametrize("path", [p for p in UNSAFE_PATHS if p])
def test_signed_image_with_an_unsafe_path_is_refused_on_load(path: str) -> None:
    image = signed_image_of(raw_content([(path.encode(), b"payload")]))
    with pytest.raises(FormatError, match="unsafe path"):
        load_image(image)


def test_signed_image_with_files_out_of_order_is_refused() -> None:
    image = signed_image_of(raw_content([(b"main.py", b"1"), (b"app/x.py", b"2")]))
    with pytest.raises(FormatError, match="canonical order"):
        load_image(image)


def test_signed_image_with_a_duplicated_path_is_refused() -> None:
    image = signed_image_of(raw_content([(b"main.py", b"1"), (b"main.py", b"2")]))
    with pytest.raises(FormatError, match="canonical order"):
        load_image(image)


def test_signed_image_with_data_after_its_last_file_is_refused() -> None:
    image = signed_image_of(raw_content([(b"main.py", b"1")], trailer=b"extra"))
    with pytest.raises(FormatError, match="after its last file"):
        load_image(image)


def test_signed_image_whose_file_runs_past_the_end_is_refused() -> None:
    content = raw_content([(b"main.py", b"print()")])[:-3]
    with pytest.raises(TruncatedError):
        load_image(signed_image_of(content))


# --- collecting the source tree ------------------------------------------------------------------


def test_collect_tree_refuses_a_symlinked_file(enclave_src: Path) -> None:
    (enclave_src / "link.py").symlink_to(enclave_src / "main.py")
    with pytest.raises(InputError, match="symbolic link"):
        collect_tree(enclave_src)


def test_collect_tree_refuses_a_symlinked_directory(enclave_src: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.py").write_bytes(b"KEY = 'not for the image'")
    (enclave_src / "vendor").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InputError, match="symbolic link"):
        collect_tree(enclave_src)


def test_collect_tree_refuses_a_dangling_symlink(enclave_src: Path) -> None:
    (enclave_src / "gone.py").symlink_to(enclave_src / "does-not-exist.py")
    with pytest.raises(InputError, match="symbolic link"):
        collect_tree(enclave_src)


def test_collect_tree_refuses_a_tree_without_python_source(
    make_enclave_source: MakeEnclaveSource,
) -> None:
    src = make_enclave_source("data-only", files={"weights.bin": b"\x00" * 8})
    with pytest.raises(InputError, match="no Python source"):
        collect_tree(src)


def test_collect_tree_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        collect_tree(tmp_path / "missing")


# --- registration in the fleet policy ------------------------------------------------------------


def test_enclave_build_registers_its_reference_value_and_bumps_the_policy_version(
    fleet_home: FleetHome, enclave_src: Path, tmp_path: Path
) -> None:
    before = fleet_home.load_policy()
    sigstruct = build_enclave(fleet_home, enclave_src, tmp_path / "e.img", svn=2, product_id=7)

    policy = parse_policy(fleet_home.policy_path.read_text())
    assert policy.version == before.version + 1
    assert policy.enclave_references == (EnclaveReference(sigstruct.mrenclave, 2, 7, False),)
    loaded = load_image((tmp_path / "e.img").read_bytes())
    assert loaded.mrenclave == sigstruct.mrenclave
    assert loaded.mrsigner == fleet_home.verify_key("enclave").fingerprint
    assert loaded.mrsigner in policy.allowed_signers


def test_building_the_same_enclave_twice_adds_no_duplicate_reference(
    fleet_home: FleetHome, enclave_src: Path, tmp_path: Path
) -> None:
    build_enclave(fleet_home, enclave_src, tmp_path / "first.img", svn=2)
    after_first = fleet_home.policy_path.read_text()
    build_enclave(fleet_home, enclave_src, tmp_path / "second.img", svn=2)

    assert fleet_home.policy_path.read_text() == after_first
    assert len(parse_policy(after_first).enclave_references) == 1


def test_a_new_svn_of_the_same_tree_adds_a_second_reference(
    fleet_home: FleetHome, enclave_src: Path, tmp_path: Path
) -> None:
    build_enclave(fleet_home, enclave_src, tmp_path / "v2.img", svn=2)
    build_enclave(fleet_home, enclave_src, tmp_path / "v3.img", svn=3)

    policy = fleet_home.load_policy()
    assert [r.svn for r in policy.enclave_references] == [2, 3]
    assert policy.version == 3


def test_enclave_build_refuses_an_existing_output(
    fleet_home: FleetHome, enclave_src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "existing.img"
    out.write_bytes(b"keep me")
    policy_before = fleet_home.policy_path.read_bytes()

    with pytest.raises(InputError, match="already exists"):
        build_enclave(fleet_home, enclave_src, out, svn=1)
    assert out.read_bytes() == b"keep me"
    assert fleet_home.policy_path.read_bytes() == policy_before


@pytest.mark.parametrize("svn", [0, -1, 2**31])
def test_enclave_build_refuses_an_svn_out_of_range(
    fleet_home: FleetHome, enclave_src: Path, tmp_path: Path, svn: int
) -> None:
    with pytest.raises(InputError, match="SVN"):
        build_enclave(fleet_home, enclave_src, tmp_path / "e.img", svn=svn)
    assert not (tmp_path / "e.img").exists()


def test_enclave_build_that_cannot_update_the_policy_leaves_no_image(
    fleet_home: FleetHome, enclave_src: Path, tmp_path: Path
) -> None:
    fleet_home.policy_path.write_text("this is [not toml")
    out = tmp_path / "e.img"

    with pytest.raises(FormatError, match="not valid TOML"):
        build_enclave(fleet_home, enclave_src, out, svn=1)
    assert not out.exists()
    assert list(tmp_path.glob(".e.img.*")) == []
