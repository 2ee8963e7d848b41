"""The enclave image: canonical, reproducible content plus a signed SIGSTRUCT-like manifest.

Layout (integers big-endian)::

    image   = "SRIMG\\0\\0\\1" | u32 sigstruct length | sigstruct (canonical JSON)
              | Ed25519 signature (64 bytes) | content
    content = "SRENC\\0\\0\\1" | u32 file count | file*        (files sorted by path)
    file    = u16 path length | path (UTF-8, POSIX, relative) | u32 size | bytes

Content has no modes, owners or timestamps, so building the same tree twice gives the same bytes.
MRENCLAVE is the SHA-256 of the content; MRSIGNER is the SHA-256 of the signer's raw Ed25519
public key, which the sigstruct carries (as SGX's SIGSTRUCT carries the signer's modulus).
`load_image` measures the content it was given, never a claimed value, and checks the signature
before returning anything; whether the signer is *trusted* is a policy decision made elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strongroom import canonical
from strongroom.errors import FormatError, IntegrityError, TruncatedError
from strongroom.fields import MAX_VERSION, get_bool, get_hex, get_int
from strongroom.signing import SIGNATURE_SIZE, SigningKey, VerifyKey

IMAGE_MAGIC = b"SRIMG\x00\x00\x01"
CONTENT_MAGIC = b"SRENC\x00\x00\x01"
FORMAT = "strongroom-enclave-image/1"
SIGSTRUCT_DOMAIN = b"strongroom/enclave-sigstruct/v1"
MAX_SIGSTRUCT_SIZE = 4096
MAX_FILES = 10_000
MAX_PATH_BYTES = 1024
MAX_CONTENT_SIZE = 256 * 1024 * 1024
_WHAT = "enclave sigstruct"


@dataclass(frozen=True)
class EnclaveIdentity:
    """Who an enclave is: what local reports bind and evidence claims (SGX: MRENCLAVE, MRSIGNER,
    ISVPRODID, ISVSVN and the debug attribute)."""

    mrenclave: str
    mrsigner: str
    product_id: int
    svn: int
    debug: bool


@dataclass(frozen=True)
class Sigstruct:
    """The signed identity of an enclave build."""

    mrenclave: str
    product_id: int
    svn: int
    debug: bool
    signer_key: VerifyKey

    @property
    def mrsigner(self) -> str:
        return self.signer_key.fingerprint

    @property
    def identity(self) -> EnclaveIdentity:
        return EnclaveIdentity(self.mrenclave, self.mrsigner, self.product_id, self.svn, self.debug)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "mrenclave": self.mrenclave,
            "mrsigner": self.mrsigner,
            "product_id": self.product_id,
            "svn": self.svn,
            "debug": self.debug,
            "signer_key": self.signer_key.raw.hex(),
        }

    @classmethod
    def from_json_dict(cls, doc: dict[str, Any]) -> Sigstruct:
        if doc.get("format") != FORMAT:
            raise FormatError(f"unsupported enclave image format {doc.get('format')!r}")
        sig = cls(
            mrenclave=get_hex(doc, "mrenclave", _WHAT, 32).hex(),
            product_id=get_int(doc, "product_id", _WHAT, 0, 65535),
            svn=get_int(doc, "svn", _WHAT, 1, MAX_VERSION),
            debug=get_bool(doc, "debug", _WHAT),
            signer_key=VerifyKey(get_hex(doc, "signer_key", _WHAT, 32)),
        )
        if get_hex(doc, "mrsigner", _WHAT, 32).hex() != sig.mrsigner:
            raise FormatError(f"{_WHAT}: mrsigner does not match the signer key")
        return sig


@dataclass(frozen=True)
class VerifiedImage:
    """An image whose signature verified and whose measured content matches its sigstruct."""

    sigstruct: Sigstruct
    files: Mapping[str, bytes]
    content: bytes  # the exact bytes that were measured

    @property
    def mrenclave(self) -> str:
        return self.sigstruct.mrenclave

    @property
    def mrsigner(self) -> str:
        return self.sigstruct.mrsigner


def check_path(path: str) -> str:
    """Accept only relative POSIX paths without empty, '.' or '..' parts."""
    parts = path.split("/")
    try:
        encoded = path.encode()
    except UnicodeEncodeError as e:
        raise FormatError(f"path in enclave image is not valid UTF-8: {path!r}") from e
    if (
        not path
        or len(encoded) > MAX_PATH_BYTES
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in path
        or "\x00" in path
    ):
        raise FormatError(f"unsafe path in enclave image: {path!r}")
    return path


def canonical_content(files: Mapping[str, bytes]) -> bytes:
    """The canonical byte form of a file tree; MRENCLAVE is its SHA-256."""
    if len(files) > MAX_FILES:
        raise FormatError(f"an enclave image holds at most {MAX_FILES} files")
    out = [CONTENT_MAGIC, len(files).to_bytes(4, "big")]
    for path in sorted(files):
        encoded = check_path(path).encode()
        data = files[path]
        out += [len(encoded).to_bytes(2, "big"), encoded, len(data).to_bytes(4, "big"), data]
    content = b"".join(out)
    if len(content) > MAX_CONTENT_SIZE:
        raise FormatError(f"an enclave image holds at most {MAX_CONTENT_SIZE} bytes")
    return content


def parse_content(content: bytes) -> dict[str, bytes]:
    """Parse canonical content, rejecting anything a canonical build would not produce."""
    view = memoryview(content)
    if bytes(view[:8]) != CONTENT_MAGIC or len(view) < 12:
        raise FormatError("enclave image content has a bad magic")
    count = int.from_bytes(view[8:12], "big")
    if count > MAX_FILES:
        raise FormatError("enclave image has too many files")
    files: dict[str, bytes] = {}
    pos, previous = 12, ""
    for _ in range(count):
        if pos + 2 > len(view):
            raise TruncatedError("enclave image ends inside a file entry")
        plen = int.from_bytes(view[pos : pos + 2], "big")
        end = pos + 2 + plen
        if end + 4 > len(view):
            raise TruncatedError("enclave image ends inside a file entry")
        try:
            path = check_path(bytes(view[pos + 2 : end]).decode())
        except UnicodeDecodeError as e:
            raise FormatError("enclave image has a path that is not UTF-8") from e
        if files and path <= previous:
            raise FormatError("enclave image files are not in canonical order")
        size = int.from_bytes(view[end : end + 4], "big")
        if end + 4 + size > len(view):
            raise TruncatedError(f"enclave image ends inside {path}")
        files[path] = bytes(view[end + 4 : end + 4 + size])
        pos, previous = end + 4 + size, path
    if pos != len(view):
        raise FormatError("enclave image has data after its last file")
    return files


def measure(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def build_image(
    files: Mapping[str, bytes],
    signing_key: SigningKey,
    *,
    svn: int,
    product_id: int = 1,
    debug: bool = False,
) -> tuple[bytes, Sigstruct]:
    """Build the canonical, signed image bytes for `files`."""
    content = canonical_content(files)
    sigstruct = Sigstruct(
        mrenclave=measure(content),
        product_id=product_id,
        svn=svn,
        debug=debug,
        signer_key=signing_key.verify_key,
    )
    body = canonical.dumps(sigstruct.to_json_dict())
    signature = signing_key.sign(SIGSTRUCT_DOMAIN, body)
    image = IMAGE_MAGIC + len(body).to_bytes(4, "big") + body + signature + content
    return image, sigstruct


def load_image(data: bytes) -> VerifiedImage:
    """Verify an image's signature, measure its content and return it; raise on any mismatch."""
    if data[:8] != IMAGE_MAGIC or len(data) < 12:
        raise FormatError("not a Strongroom enclave image (bad magic)")
    body_len = int.from_bytes(data[8:12], "big")
    if not 2 <= body_len <= MAX_SIGSTRUCT_SIZE:
        raise FormatError("enclave sigstruct length out of range")
    body_end = 12 + body_len
    if len(data) < body_end + SIGNATURE_SIZE:
        raise TruncatedError("enclave image ends inside its sigstruct")
    body = data[12:body_end]
    signature = data[body_end : body_end + SIGNATURE_SIZE]
    sigstruct = Sigstruct.from_json_dict(canonical.loads_object(body, _WHAT))
    sigstruct.signer_key.verify(SIGSTRUCT_DOMAIN, body, signature)
    content = data[body_end + SIGNATURE_SIZE :]
    if measure(content) != sigstruct.mrenclave:
        raise IntegrityError(
            "enclave image content does not match its signed measurement (MRENCLAVE)",
            hint="the image was modified after signing; rebuild it with `strongroom enclave build`",
        )
    return VerifiedImage(sigstruct, parse_content(content), content)
