"""The encrypted artifact container: a signed manifest followed by an AES-256-GCM STREAM body.

Layout (all integers big-endian)::

    magic "SRARTF\\0\\1" | u32 header length | header (canonical JSON manifest)
    | Ed25519 signature (64 bytes) | chunk 0 | chunk 1 | ... | final chunk

Each chunk is `chunk_size` bytes of plaintext (the final one 0..chunk_size bytes) encrypted with the
artifact's own 256-bit data key and a 16-byte tag. The nonce of chunk i is
`nonce_prefix (7 bytes) | i (u32) | final flag (1 byte)` and every chunk's associated data is the
SHA-256 of the header, so truncation, reordering, duplication, bit flips and headers swapped
between artifacts all fail authentication (the STREAM construction of Hoang, Reyhanitabar,
Rogaway and Vizár). The manifest carries a key check value (an HMAC of the key id under the data
key) so that a wrong key is told apart from a corrupt body, and AES-GCM's lack of key commitment
is closed. Sealing and opening use two fixed buffers of one chunk each: memory stays bounded
whatever the artifact's size.

This module does no file-system I/O of its own: it reads and writes the streams it is given.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from strongroom import canonical
from strongroom.errors import (
    FormatError,
    InputError,
    IntegrityError,
    SignatureError,
    TruncatedError,
    WrongKeyError,
)
from strongroom.fields import (
    ARTIFACT_NAME_RE,
    MAX_VERSION,
    get_hex,
    get_int,
    get_str,
)
from strongroom.signing import SIGNATURE_SIZE, SigningKey, VerifyKey

MAGIC = b"SRARTF\x00\x01"
FORMAT = "strongroom-artifact/1"
CIPHER = "A256GCM-STREAM"
MANIFEST_DOMAIN = b"strongroom/artifact-manifest/v1"
KEY_CHECK_DOMAIN = b"strongroom/artifact-key-check/v1\x00"
DATA_KEY_SIZE = 32
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
MAX_HEADER_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 16
MAX_CHUNK_SIZE = 16 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
MAX_CHUNKS = 2**32
KINDS = ("code", "model")
Kind = Literal["code", "model"]
_WHAT = "artifact manifest"


@dataclass(frozen=True)
class ArtifactManifest:
    """What the artifact-signing key vouches for. Holds no key material."""

    name: str
    version: int
    kind: Kind
    size: int
    sha256: str
    chunk_size: int
    min_svn: int
    key_id: str
    key_check: bytes
    nonce_prefix: bytes
    signer_key: VerifyKey

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    @property
    def signer(self) -> str:
        return self.signer_key.fingerprint

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "cipher": CIPHER,
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "size": self.size,
            "sha256": self.sha256,
            "chunk_size": self.chunk_size,
            "min_svn": self.min_svn,
            "key_id": self.key_id,
            "key_check": self.key_check.hex(),
            "nonce_prefix": self.nonce_prefix.hex(),
            "signer_key": self.signer_key.raw.hex(),
        }

    @classmethod
    def from_json_dict(cls, doc: dict[str, Any]) -> ArtifactManifest:
        if doc.get("format") != FORMAT:
            raise FormatError(f"unsupported artifact format {str(doc.get('format'))[:64]!r}")
        if doc.get("cipher") != CIPHER:
            raise FormatError(f"unsupported artifact cipher {str(doc.get('cipher'))[:64]!r}")
        name = get_str(doc, "name", _WHAT)
        if not ARTIFACT_NAME_RE.fullmatch(name):
            raise FormatError(f"{_WHAT}: invalid name {name[:64]!r}")
        kind = get_str(doc, "kind", _WHAT)
        if kind not in KINDS:
            raise FormatError(f"{_WHAT}: invalid kind {kind[:16]!r}")
        chunk_size = get_int(doc, "chunk_size", _WHAT, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
        size = get_int(doc, "size", _WHAT, 0, MAX_CHUNKS * chunk_size)
        key_id = get_str(doc, "key_id", _WHAT)
        if not key_id.isalnum() or not key_id.isascii() or len(key_id) > 64:
            raise FormatError(f"{_WHAT}: invalid key id")
        return cls(
            name=name,
            version=get_int(doc, "version", _WHAT, 1, MAX_VERSION),
            kind="code" if kind == "code" else "model",
            size=size,
            sha256=get_hex(doc, "sha256", _WHAT, 32).hex(),
            chunk_size=chunk_size,
            min_svn=get_int(doc, "min_svn", _WHAT, 0, MAX_VERSION),
            key_id=key_id,
            key_check=get_hex(doc, "key_check", _WHAT, 32),
            nonce_prefix=get_hex(doc, "nonce_prefix", _WHAT, NONCE_PREFIX_SIZE),
            signer_key=VerifyKey(get_hex(doc, "signer_key", _WHAT, 32)),
        )


@dataclass(frozen=True)
class SignedManifest:
    """A parsed manifest with the exact header bytes and signature it was read from."""

    manifest: ArtifactManifest
    header: bytes
    signature: bytes

    @property
    def associated_data(self) -> bytes:
        return hashlib.sha256(self.header).digest()

    def verify(self, trusted: VerifyKey) -> ArtifactManifest:
        """Return the manifest if `trusted` signed it, else raise SignatureError."""
        if not hmac.compare_digest(self.manifest.signer_key.raw, trusted.raw):
            raise SignatureError(
                f"artifact was signed by {self.manifest.signer[:16]}…, "
                f"not by the expected key {trusted.fingerprint[:16]}…"
            )
        trusted.verify(MANIFEST_DOMAIN, self.header, self.signature)
        return self.manifest


def key_check(data_key: bytes | bytearray, key_id: str) -> bytes:
    """The key check value the manifest carries: HMAC-SHA256(data key, domain | key id)."""
    return hmac.new(bytes(data_key), KEY_CHECK_DOMAIN + key_id.encode(), hashlib.sha256).digest()


def read_manifest(stream: io.BufferedIOBase) -> SignedManifest:
    """Read and parse the header of an artifact; the signature is checked by `verify`."""
    prefix = stream.read(len(MAGIC) + 4)
    if len(prefix) < len(MAGIC) + 4 or prefix[: len(MAGIC)] != MAGIC:
        raise FormatError("not a Strongroom artifact (bad magic)")
    header_len = int.from_bytes(prefix[len(MAGIC) :], "big")
    if not 2 <= header_len <= MAX_HEADER_SIZE:
        raise FormatError("artifact header length out of range")
    header = stream.read(header_len)
    signature = stream.read(SIGNATURE_SIZE)
    if len(header) != header_len or len(signature) != SIGNATURE_SIZE:
        raise TruncatedError("artifact ends inside its header")
    manifest = ArtifactManifest.from_json_dict(canonical.loads_object(header, _WHAT))
    return SignedManifest(manifest, header, signature)


def _read_exact_into(stream: Readable, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if final else b"\x00")


def _chunk_len(manifest: ArtifactManifest, index: int) -> int:
    if index < manifest.chunk_count - 1:
        return manifest.chunk_size
    return manifest.size - manifest.chunk_size * (manifest.chunk_count - 1)


def _hash_stream(src: io.BufferedIOBase, buf: bytearray) -> tuple[int, str]:
    digest = hashlib.sha256()
    view = memoryview(buf)
    size = 0
    while n := _read_exact_into(src, view):
        digest.update(view[:n])
        size += n
    return size, digest.hexdigest()


def seal_stream(
    src: io.BufferedIOBase,
    dst: BinaryIO,
    *,
    name: str,
    version: int,
    kind: Kind,
    data_key: bytes | bytearray,
    key_id: str,
    signing_key: SigningKey,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    min_svn: int = 0,
) -> SignedManifest:
    """Encrypt the seekable `src` into `dst` and return the signed manifest written.

    Two passes over `src`: the first fixes its size and digest for the header, the second
    encrypts; a source that changes in between is refused.
    """
    if len(data_key) != DATA_KEY_SIZE:
        raise InputError("a data key has 32 bytes")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise InputError(f"chunk size must be between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}")
    buf = bytearray(chunk_size)
    size, sha256 = _hash_stream(src, buf)
    manifest = ArtifactManifest(
        name=name,
        version=version,
        kind=kind,
        size=size,
        sha256=sha256,
        chunk_size=chunk_size,
        min_svn=min_svn,
        key_id=key_id,
        key_check=key_check(data_key, key_id),
        nonce_prefix=os.urandom(NONCE_PREFIX_SIZE),
        signer_key=signing_key.verify_key,
    )
    if manifest.chunk_count > MAX_CHUNKS:
        raise InputError("file is too large for this chunk size; choose a larger chunk size")
    header = canonical.dumps(manifest.to_json_dict())
    signed = SignedManifest(manifest, header, signing_key.sign(MANIFEST_DOMAIN, header))
    dst.write(MAGIC + len(header).to_bytes(4, "big") + header + signed.signature)

    src.seek(0)
    aead = AESGCM(bytes(data_key))
    aad = signed.associated_data
    out = bytearray(chunk_size + TAG_SIZE)
    view, out_view = memoryview(buf), memoryview(out)
    digest = hashlib.sha256()
    for index in range(manifest.chunk_count):
        want = _chunk_len(manifest, index)
        if _read_exact_into(src, view[:want]) != want:
            raise InputError("the file changed while it was being sealed; try again")
        digest.update(view[:want])
        final = index == manifest.chunk_count - 1
        aead.encrypt_into(
            _nonce(manifest.nonce_prefix, index, final),
            view[:want],
            aad,
            out_view[: want + TAG_SIZE],
        )
        dst.write(out_view[: want + TAG_SIZE])
    if src.read(1) or digest.hexdigest() != sha256:
        raise InputError("the file changed while it was being sealed; try again")
    buf[:] = bytes(len(buf))
    return signed


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def readinto(self, buffer: Any, /) -> int | None: ...


def open_stream(
    stream: Readable,
    signed: SignedManifest,
    data_key: bytes | bytearray,
    into: bytearray | None = None,
) -> Iterator[memoryview]:
    """Decrypt the body that follows the manifest in `stream`, one chunk at a time.

    `signed` must already be verified. Each yielded view is authenticated but is only valid until
    the next iteration, and the artifact as a whole is authentic only once the iterator ends
    without an error (a truncated stream raises at the end). The plaintext buffer is wiped when
    the iterator finishes or is closed. With `into` (a buffer of the plaintext's size), chunks
    are decrypted straight into it instead, and the views yielded are slices of it.
    """
    manifest = signed.manifest
    if len(data_key) != DATA_KEY_SIZE or not hmac.compare_digest(
        key_check(data_key, manifest.key_id), manifest.key_check
    ):
        raise WrongKeyError(f"the key does not open artifact {manifest.name} v{manifest.version}")
    if into is not None and len(into) != manifest.size:
        raise InputError("the plaintext buffer must have the artifact's size")
    aead = AESGCM(bytes(data_key))
    aad = signed.associated_data
    ct = bytearray(manifest.chunk_size + TAG_SIZE)
    pt = bytearray(0 if into is not None else manifest.chunk_size)
    ct_view = memoryview(ct)
    try:
        for index in range(manifest.chunk_count):
            want = _chunk_len(manifest, index)
            start = index * manifest.chunk_size
            pt_view = memoryview(into)[start:] if into is not None else memoryview(pt)
            if _read_exact_into(stream, ct_view[: want + TAG_SIZE]) != want + TAG_SIZE:
                raise TruncatedError(f"artifact ends inside chunk {index}")
            final = index == manifest.chunk_count - 1
            try:
                aead.decrypt_into(
                    _nonce(manifest.nonce_prefix, index, final),
                    ct_view[: want + TAG_SIZE],
                    aad,
                    pt_view[:want],
                )
            except InvalidTag as e:
                raise IntegrityError(f"artifact chunk {index} failed authentication") from e
            if final and stream.read(1):
                raise FormatError("artifact has data after its final chunk")
            yield pt_view[:want]
    finally:
        pt[:] = bytes(len(pt))
