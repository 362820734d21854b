"""Storage locations: a local path or ``s3://bucket/prefix``, parsed once, printed safely."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


class StorageError(OSError):
    """A storage location cannot be used; the message names the URI and the likely fix."""


@dataclass(frozen=True)
class Location:
    scheme: str  # "file" or "s3"
    bucket: str  # "" for local paths
    key: str  # prefix inside the bucket (no leading slash), or the local absolute path

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}".rstrip("/") if self.is_s3 else self.key


def parse_uri(uri: str) -> Location:
    """``s3://bucket/prefix`` -> Location("s3", bucket, prefix); anything else is a local path."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"empty storage location {uri!r}: give a local path or s3://bucket/prefix")
    if "://" in uri:
        p = urlparse(uri)
        if p.scheme == "file":
            return Location("file", "", str(Path(p.path).expanduser().resolve()))
        if p.scheme not in ("s3", "s3a"):
            raise StorageError(
                f"unsupported storage scheme in {redact_uri(uri)!r}: use a local path or s3://bucket/prefix "
                "(for other S3-compatible stores, set storage.s3.endpoint_url / the endpoint option)"
            )
        if p.username or p.password:
            raise StorageError(
                f"{redact_uri(uri)!r} carries credentials inside the URI; remove them and set "
                "storage.s3.access_key_id/storage.s3.secret_access_key or the AWS_* environment variables instead"
            )
        if not p.netloc:
            raise StorageError(f"{uri!r} has no bucket name: use s3://bucket/prefix")
        return Location("s3", p.netloc, p.path.lstrip("/").rstrip("/"))
    return Location("file", "", str(Path(uri).expanduser().resolve()))


def redact_uri(uri: str) -> str:
    """The URI without any ``user:password@`` part or query string (which may hold secrets)."""
    try:
        p = urlparse(uri)
    except ValueError:
        return "<unparseable URI>"
    if not p.scheme:
        return uri
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return f"{p.scheme}://{host}{p.path}"


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out
