"""The encrypted artifact container: round trips, and every tampering STREAM must catch."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from strongroom import artifact, canonical
from strongroom.artifact import (
    MAGIC,
    MANIFEST_DOMAIN,
    TAG_SIZE,
    SignedManifest,
    open_stream,
    read_manifest,
    seal_stream,
)
from strongroom.errors import (
    FormatError,
    InputError,
    IntegrityError,
    SignatureError,
    TruncatedError,
    WrongKeyError,
)
from strongroom.signing import SIGNATURE_SIZE, SigningKey, VerifyKey

CHUNK = 64
PREFIX = len(MAGIC) + 4  # magic and the u32 header length
SIGNER = SigningKey.generate()
OTHER_SIGNER = SigningKey.generate()
# fixed examples (no luck), no per-example deadline and no speed check (a loaded machine)
PROPERTY = settings(
    max_examples=75, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@dataclass(frozen=True)
class Sealed:
    """One sealed artifact and what a test needs to take it apart."""

    plaintext: bytes
    data: bytes
    data_key: bytes
    signed: SignedManifest

    @property
    def body_start(self) -> int:
        return PREFIX + len(self.signed.header) + SIGNATURE_SIZE

    @property
    def header_part(self) -> bytes:
        return self.data[: self.body_start]

    @property
    def body(self) -> bytes:
        return self.data[self.body_start :]

    def chunks(self) -> list[bytes]:
        """The body split into its encrypted chunks (each with its tag)."""
        step = CHUNK + TAG_SIZE
        body = self.body
        return [body[i : i + step] for i in range(0, len(body), step)]


def seal(
    plaintext: bytes,
    *,
    data_key: bytes | None = None,
    key_id: str = "k1",
    signing_key: SigningKey = SIGNER,
    chunk_size: int = CHUNK,
) -> Sealed:
    data_key = os.urandom(32) if data_key is None else data_key
    out = io.BytesIO()
    signed = seal_stream(
        io.BytesIO(plaintext),
        out,
        name="model",
        version=1,
        kind="model",
        data_key=data_key,
        key_id=key_id,
        signing_key=signing_key,
        chunk_size=chunk_size,
    )
    return Sealed(plaintext, out.getvalue(), data_key, signed)


def open_bytes(data: bytes, data_key: bytes, trusted: VerifyKey = SIGNER.verify_key) -> bytes:
    """Read, verify and decrypt a whole artifact, as a device would."""
    stream = io.BytesIO(data)
    signed = read_manifest(stream)
    signed.verify(trusted)
    return b"".join(bytes(view) for view in open_stream(stream, signed, data_key))


def flip(data: bytes, position: int, bit: int) -> bytes:
    mutated = bytearray(data)
    mutated[position] ^= 1 << bit
    return bytes(mutated)


# Six chunks, the last one partial: enough to reorder and duplicate in every position.
MULTI = seal(os.urandom(5 * CHUNK + 17))
N_CHUNKS = MULTI.signed.manifest.chunk_count


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 7 * CHUNK + 5])
def test_sealed_artifact_opens_to_the_original_plaintext(size: int) -> None:
    plaintext = os.urandom(size)
    sealed = seal(plaintext)

    manifest = sealed.signed.manifest
    assert open_bytes(sealed.data, sealed.data_key) == plaintext
    assert manifest.size == size
    assert manifest.sha256 == hashlib.sha256(plaintext).hexdigest()
    assert manifest.chunk_count == max(1, -(-size // CHUNK))
    assert len(sealed.body) == size + manifest.chunk_count * TAG_SIZE


def test_sealing_the_same_plaintext_twice_gives_unrelated_ciphertexts() -> None:
    plaintext = bytes(3 * CHUNK)
    key = os.urandom(32)
    first, second = seal(plaintext, data_key=key), seal(plaintext, data_key=key)

    assert first.signed.manifest.nonce_prefix != second.signed.manifest.nonce_prefix
    assert first.body != second.body


def test_ciphertext_and_manifest_do_not_contain_the_plaintext_or_the_key() -> None:
    plaintext = b"proprietary model weights " * 20
    sealed = seal(plaintext)

    assert plaintext[:32] not in sealed.data
    assert sealed.data_key not in sealed.data
    assert sealed.data_key.hex().encode() not in sealed.data


@pytest.mark.parametrize("bad_key", [b"", bytes(31), bytes(33)])
def test_sealing_refuses_a_data_key_of_the_wrong_size(bad_key: bytes) -> None:
    with pytest.raises(InputError):
        seal(b"x", data_key=bad_key)


@pytest.mark.parametrize(
    "chunk_size", [0, artifact.MIN_CHUNK_SIZE - 1, artifact.MAX_CHUNK_SIZE + 1]
)
def test_sealing_refuses_a_chunk_size_out_of_range(chunk_size: int) -> None:
    with pytest.raises(InputError):
        seal(b"x", chunk_size=chunk_size)


# --- tampering -----------------------------------------------------------------------------------


@PROPERTY
@given(cut=st.integers(min_value=0, max_value=len(MULTI.data) - 1))
@example(cut=0)
@example(cut=PREFIX - 1)
@example(cut=PREFIX)
@example(cut=MULTI.body_start - 1)
@example(cut=MULTI.body_start)
@example(cut=MULTI.body_start + CHUNK + TAG_SIZE)
@example(cut=len(MULTI.data) - 1)
def test_any_truncation_is_rejected(cut: int) -> None:
    # Cut inside the magic or the length there is nothing to parse; anywhere later the stream ends
    # before its authenticated end.
    expected = FormatError if cut < PREFIX else TruncatedError
    with pytest.raises(IntegrityError) as caught:
        open_bytes(MULTI.data[:cut], MULTI.data_key)
    assert type(caught.value) is expected


@PROPERTY
@given(pair=st.lists(st.integers(0, N_CHUNKS - 1), min_size=2, max_size=2, unique=True))
def test_reordered_chunks_are_rejected(pair: list[int]) -> None:
    i, j = sorted(pair)
    chunks = MULTI.chunks()
    chunks[i], chunks[j] = chunks[j], chunks[i]

    with pytest.raises(IntegrityError) as caught:
        open_bytes(MULTI.header_part + b"".join(chunks), MULTI.data_key)
    assert type(caught.value) is IntegrityError


@PROPERTY
@given(source=st.integers(0, N_CHUNKS - 1), position=st.integers(0, N_CHUNKS))
def test_duplicated_chunk_is_rejected(source: int, position: int) -> None:
    chunks = MULTI.chunks()
    chunks.insert(position, chunks[source])
    # A copy placed after the final chunk (or a copy of the final chunk placed just before it)
    # leaves a stream that authenticates up to its final chunk and then has trailing data; any
    # other duplicate puts a chunk where another belongs and breaks authentication.
    final = N_CHUNKS - 1
    trailing = position == N_CHUNKS or (source == final and position == final)
    expected = FormatError if trailing else IntegrityError

    with pytest.raises(IntegrityError) as caught:
        open_bytes(MULTI.header_part + b"".join(chunks), MULTI.data_key)
    assert type(caught.value) is expected


def test_a_single_chunk_artifact_with_its_chunk_repeated_is_rejected_as_trailing_data() -> None:
    sealed = seal(b"short")
    with pytest.raises(FormatError, match="after its final chunk"):
        open_bytes(sealed.data + sealed.body, sealed.data_key)


@PROPERTY
@given(position=st.integers(0, MULTI.body_start - 1), bit=st.integers(0, 7))
@example(position=0, bit=0)
@example(position=PREFIX - 1, bit=0)
@example(position=PREFIX - 2, bit=0)
@example(position=MULTI.body_start - SIGNATURE_SIZE, bit=7)
@example(position=MULTI.body_start - 1, bit=0)
def test_bit_flip_in_the_header_is_rejected(position: int, bit: int) -> None:
    mutated = flip(MULTI.data, position, bit)
    stream = io.BytesIO(mutated)
    header_end = PREFIX + len(MULTI.signed.header)

    if position < len(MAGIC):
        with pytest.raises(FormatError, match="bad magic"):
            read_manifest(stream)
        return
    if position < PREFIX:
        claimed = int.from_bytes(mutated[len(MAGIC) : PREFIX], "big")
        in_range = 2 <= claimed <= artifact.MAX_HEADER_SIZE
        runs_past_end = PREFIX + claimed + SIGNATURE_SIZE > len(mutated)
        expected = TruncatedError if in_range and runs_past_end else FormatError
        with pytest.raises(IntegrityError) as caught:
            read_manifest(stream)
        assert type(caught.value) is expected
        return
    if position < header_end:
        # The JSON either stops parsing, or parses into a manifest whose signature fails.
        try:
            signed = read_manifest(stream)
        except IntegrityError as e:
            assert type(e) is FormatError
            return
        with pytest.raises(SignatureError):
            signed.verify(SIGNER.verify_key)
        return
    signed = read_manifest(stream)  # a flipped signature still parses
    assert signed.manifest == MULTI.signed.manifest
    with pytest.raises(SignatureError):
        signed.verify(SIGNER.verify_key)


@PROPERTY
@given(position=st.integers(MULTI.body_start, len(MULTI.data) - 1), bit=st.integers(0, 7))
@example(position=MULTI.body_start, bit=0)
@example(position=len(MULTI.data) - 1, bit=7)
def test_bit_flip_in_the_body_is_rejected(position: int, bit: int) -> None:
    with pytest.raises(IntegrityError) as caught:
        open_bytes(flip(MULTI.data, position, bit), MULTI.data_key)
    assert type(caught.value) is IntegrityError


@PROPERTY
@given(wrong_key=st.binary(min_size=32, max_size=32).filter(lambda k: k != MULTI.data_key))
def test_a_wrong_data_key_is_told_apart_from_corruption(wrong_key: bytes) -> None:
    stream = io.BytesIO(MULTI.data)
    signed = read_manifest(stream)
    chunks = open_stream(stream, signed, wrong_key)

    with pytest.raises(WrongKeyError):
        next(chunks)
    assert stream.tell() == MULTI.body_start  # refused before a single chunk was decrypted


@pytest.mark.parametrize("bad_key", [b"", bytes(16), bytes(31), bytes(33)])
def test_a_data_key_of_the_wrong_size_is_a_wrong_key(bad_key: bytes) -> None:
    with pytest.raises(WrongKeyError):
        open_bytes(MULTI.data, bad_key)


def test_header_swapped_between_artifacts_fails_authentication() -> None:
    size = 3 * CHUNK + 9
    first, second = seal(os.urandom(size)), seal(os.urandom(size))
    spliced = first.header_part + second.body

    # With the key its header names, the foreign body does not authenticate...
    with pytest.raises(IntegrityError) as caught:
        open_bytes(spliced, first.data_key)
    assert type(caught.value) is IntegrityError
    # ...and the body's own key does not match the header's key check.
    with pytest.raises(WrongKeyError):
        open_bytes(spliced, second.data_key)


def test_header_swapped_between_artifacts_under_one_key_fails_authentication() -> None:
    # Even with the same data key and key id, each body is bound to its own header.
    key = os.urandom(32)
    plaintext = os.urandom(2 * CHUNK)
    first, second = seal(plaintext, data_key=key), seal(plaintext, data_key=key)

    with pytest.raises(IntegrityError) as caught:
        open_bytes(first.header_part + second.body, key)
    assert type(caught.value) is IntegrityError


def test_manifest_signed_by_another_key_is_rejected() -> None:
    foreign = seal(b"foreign", signing_key=OTHER_SIGNER)
    signed = read_manifest(io.BytesIO(foreign.data))

    with pytest.raises(SignatureError):
        signed.verify(SIGNER.verify_key)
    assert signed.verify(OTHER_SIGNER.verify_key) == foreign.signed.manifest


def test_manifest_claiming_the_trusted_signer_but_signed_by_another_key_is_rejected() -> None:
    foreign = seal(b"foreign", signing_key=OTHER_SIGNER)
    doc = json.loads(foreign.signed.header)
    doc["signer_key"] = SIGNER.verify_key.raw.hex()
    header = canonical.dumps(doc)
    forged = (
        MAGIC
        + len(header).to_bytes(4, "big")
        + header
        + OTHER_SIGNER.sign(MANIFEST_DOMAIN, header)
        + foreign.body
    )
    signed = read_manifest(io.BytesIO(forged))

    with pytest.raises(SignatureError):
        signed.verify(SIGNER.verify_key)


@pytest.mark.parametrize(
    "header",
    [b"[]", b'"text"', b"not json", b"\xff\xfe", b"[" * 30_000 + b"]" * 30_000],
    ids=["array", "string", "garbage", "not-utf8", "deeply-nested"],
)
def test_header_that_is_not_a_json_object_is_a_format_error(header: bytes) -> None:
    data = MAGIC + len(header).to_bytes(4, "big") + header + bytes(SIGNATURE_SIZE)
    with pytest.raises(FormatError):
        read_manifest(io.BytesIO(data))


# --- bounded memory ------------------------------------------------------------------------------


def test_opened_chunks_are_views_of_one_chunk_sized_buffer() -> None:
    stream = io.BytesIO(MULTI.data)
    signed = read_manifest(stream)
    buffers, sizes = set(), []
    for view in open_stream(stream, signed, MULTI.data_key):
        sizes.append(len(view))
        buffers.add(id(view.obj))

    assert max(sizes) <= CHUNK
    assert sum(sizes) == len(MULTI.plaintext)
    assert len(buffers) == 1  # every chunk reuses the same plaintext buffer


def test_plaintext_buffer_is_wiped_when_opening_finishes() -> None:
    stream = io.BytesIO(MULTI.data)
    signed = read_manifest(stream)
    views = list(open_stream(stream, signed, MULTI.data_key))

    assert all(not any(view) for view in views)


def test_plaintext_buffer_is_wiped_when_opening_is_abandoned() -> None:
    stream = io.BytesIO(MULTI.data)
    signed = read_manifest(stream)
    chunks = open_stream(stream, signed, MULTI.data_key)
    first = next(chunks)
    assert bytes(first) == MULTI.plaintext[:CHUNK]

    chunks.close()
    assert not any(first)


def test_sealing_and_opening_use_memory_bounded_by_the_chunk_size(tmp_path: Path) -> None:
    chunk_size = 16 * 1024
    size = 4 * 1024 * 1024
    src, sealed = tmp_path / "model.bin", tmp_path / "model.art"
    src.write_bytes(os.urandom(size))
    key = os.urandom(32)
    budget = 16 * chunk_size  # a few chunk buffers and file-object overhead; the file is 256 chunks

    tracemalloc.start()
    try:
        with src.open("rb") as f_in, sealed.open("wb") as f_out:
            seal_stream(
                f_in,
                f_out,
                name="model",
                version=1,
                kind="model",
                data_key=key,
                key_id="k1",
                signing_key=SIGNER,
                chunk_size=chunk_size,
            )
        _, seal_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        digest = hashlib.sha256()
        with sealed.open("rb") as f:
            signed = read_manifest(f)
            for view in open_stream(f, signed, key):
                digest.update(view)
        _, open_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert digest.hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
    assert seal_peak < budget
    assert open_peak < budget
