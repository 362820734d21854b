"""Local paths and ``s3://bucket/prefix`` URIs behind one small API.

Everything that touches run directories or datasets goes through here so that S3 settings
(endpoint, region, addressing style, retries, timeouts, credentials) are applied the same way
for boto3 (small control-plane calls, checks, run files) and pyarrow (bulk reads by Ray Data,
Ray Train checkpoints).

Credentials come from ``S3Config`` (``SecretStr``) or the standard AWS chain. They are passed to
clients in memory only: no function here logs, prints, stores or puts them in an exception.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

if TYPE_CHECKING:
    from orchestrator.config import S3Config

log = logging.getLogger(__name__)

# Error codes S3 (and S3-compatible stores) return for overload or transient server trouble.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)


class StorageError(OSError):
    """A storage location cannot be used; the message names the URI and the likely fix."""


# ---------------------------------------------------------------------------------------------
# URIs


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
                "(for other S3-compatible stores, set data.s3.endpoint_url / the endpoint option)"
            )
        if p.username or p.password:
            raise StorageError(
                f"{redact_uri(uri)!r} carries credentials inside the URI; remove them and set "
                "s3.access_key_id/s3.secret_access_key or the AWS_* environment variables instead"
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


# ---------------------------------------------------------------------------------------------
# Credentials and clients


@dataclass(frozen=True)
class _Creds:
    access_key: str | None
    secret_key: str | None
    token: str | None

    def __repr__(self) -> str:  # never show secrets, even in a debugger or traceback
        return f"_Creds(access_key={'set' if self.access_key else None}, secret_key=***)"


class _SecretScrubber(logging.Filter):
    """Replaces known secrets in log records of libraries we call.

    botocore logs the canonical request (with the session token) and request headers at DEBUG
    level; a user who turns on DEBUG logging must still not see credentials in the output.
    """

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - never break logging
            return True
        scrubbed = text
        for secret in self.secrets:
            if secret in scrubbed:
                scrubbed = scrubbed.replace(secret, "***")
        if scrubbed is not text and scrubbed != text:
            record.msg, record.args = scrubbed, None
        return True


_scrubber = _SecretScrubber()
for _name in (
    "botocore",
    "botocore.auth",
    "botocore.endpoint",
    "botocore.httpsession",
    "botocore.parsers",
    "botocore.hooks",
    "botocore.credentials",
    "botocore.retryhandler",
    "botocore.retries.standard",
    "urllib3.connectionpool",
):
    logging.getLogger(_name).addFilter(_scrubber)


def _register_secrets(*values: str | None) -> None:
    for v in values:
        # Short values (e.g. "testing") would shred ordinary log text and protect nothing real.
        if v and len(v) >= 8:
            _scrubber.secrets.add(v)


def _default_s3cfg() -> "S3Config":
    from orchestrator.config import S3Config

    return S3Config()


def resolve_credentials(s3cfg: "S3Config | None") -> _Creds:
    """Explicit keys from the config, else the named profile, else (None...) = the AWS chain."""
    s3cfg = s3cfg or _default_s3cfg()
    if s3cfg.access_key_id is not None or s3cfg.secret_access_key is not None:
        if s3cfg.access_key_id is None or s3cfg.secret_access_key is None:
            raise StorageError(
                "s3 credentials are half set: give both s3.access_key_id and s3.secret_access_key, "
                "or neither (then the AWS chain is used: env vars, profile, instance role)"
            )
        creds = _Creds(
            s3cfg.access_key_id.get_secret_value(),
            s3cfg.secret_access_key.get_secret_value(),
            s3cfg.session_token.get_secret_value() if s3cfg.session_token else None,
        )
        _register_secrets(creds.secret_key, creds.token)
        return creds
    if s3cfg.profile:
        import boto3
        import botocore.exceptions

        try:
            c = boto3.Session(profile_name=s3cfg.profile).get_credentials()
        except botocore.exceptions.ProfileNotFound:
            raise StorageError(
                f"AWS profile {s3cfg.profile!r} (s3.profile) is not in ~/.aws/config or ~/.aws/credentials: "
                "create it with `aws configure --profile NAME` or unset s3.profile"
            ) from None
        if c is None:
            raise StorageError(f"AWS profile {s3cfg.profile!r} (s3.profile) has no credentials")
        f = c.get_frozen_credentials()
        _register_secrets(f.secret_key, f.token)
        return _Creds(f.access_key, f.secret_key, f.token)
    # The AWS chain. Static keys (env vars, credentials file) are resolved here, on the driver,
    # so that filesystems pickled to Ray workers carry them: workers may not share the driver's
    # environment. Refreshing sources (instance/container roles, SSO, assume-role) are left to
    # each process's own chain, because frozen copies of them expire during long runs.
    try:
        import boto3

        c = boto3.Session().get_credentials()
    except Exception:  # noqa: BLE001 - a broken chain is reported by the first real request
        c = None
    if c is not None and getattr(c, "method", "") in _STATIC_CREDENTIAL_METHODS:
        f = c.get_frozen_credentials()
        _register_secrets(f.secret_key, f.token)
        return _Creds(f.access_key, f.secret_key, f.token)
    return _Creds(None, None, None)


_STATIC_CREDENTIAL_METHODS = frozenset({"env", "shared-credentials-file", "config-file", "explicit"})


def _endpoint_parts(endpoint_url: str | None) -> tuple[str | None, str | None]:
    if not endpoint_url:
        return None, None
    p = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
    return p.netloc, p.scheme


def s3_filesystem(s3cfg: "S3Config | None", *, max_attempts: int | None = None) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem with the config's endpoint, region, retries and timeouts.

    ``max_attempts=1`` turns pyarrow's own (invisible) retries off, for callers that retry and
    count themselves (``retry_call``).
    """
    s3cfg = s3cfg or _default_s3cfg()
    # The SDK's standard mode: exponential backoff with jitter on throttling/5xx/timeouts.
    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts or s3cfg.max_attempts)
    return pafs.S3FileSystem(retry_strategy=retry, **_s3_kwargs(s3cfg))


def _s3_kwargs(s3cfg: "S3Config") -> dict[str, Any]:
    creds = resolve_credentials(s3cfg)
    endpoint, scheme = _endpoint_parts(s3cfg.endpoint_url)
    kw: dict[str, Any] = {
        "region": s3cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "connect_timeout": s3cfg.connect_timeout_s,
        "request_timeout": s3cfg.read_timeout_s,
        "force_virtual_addressing": s3cfg.addressing_style == "virtual",
    }
    if endpoint:
        kw["endpoint_override"] = endpoint
        kw["scheme"] = scheme
    if creds.access_key:
        kw.update(access_key=creds.access_key, secret_key=creds.secret_key, session_token=creds.token)
    return kw


class FsHandle:
    """A picklable recipe for an S3 filesystem, rebuilt on first use in each process.

    pyarrow's ``S3FileSystem`` pickles without its ``retry_strategy`` (seen with pyarrow 26:
    ``__reduce__`` omits it), so a filesystem shipped to Ray workers silently falls back to 3
    attempts. Ray Data tasks receive this handle instead. It holds credentials in memory only
    and never shows them in its repr.
    """

    def __init__(self, kwargs: dict[str, Any], max_attempts: int) -> None:
        self._kwargs = kwargs
        self._max_attempts = max_attempts
        self._fs: pafs.FileSystem | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_kwargs": self._kwargs, "_max_attempts": self._max_attempts, "_fs": None}

    def get(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=self._max_attempts), **self._kwargs)
        return self._fs

    def __repr__(self) -> str:
        return f"FsHandle(s3, endpoint={self._kwargs.get('endpoint_override')!r}, max_attempts={self._max_attempts})"


def s3_filesystem_handle(s3cfg: "S3Config | None", *, max_attempts: int | None = None) -> FsHandle:
    fs_kwargs = _s3_kwargs(s3cfg or _default_s3cfg())
    return FsHandle(fs_kwargs, max_attempts or (s3cfg or _default_s3cfg()).max_attempts)


def resolve_fs(fs: "pafs.FileSystem | FsHandle") -> pafs.FileSystem:
    return fs.get() if isinstance(fs, FsHandle) else fs


def filesystem_for(uri: str, s3cfg: "S3Config | None" = None, *, max_attempts: int | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or ``s3://bucket/prefix``."""
    loc = parse_uri(uri)
    if loc.is_s3:
        return s3_filesystem(s3cfg, max_attempts=max_attempts), f"{loc.bucket}/{loc.key}".rstrip("/")
    return pafs.LocalFileSystem(), loc.key


def ray_storage(uri: str, s3cfg: "S3Config | None" = None) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``.

    With an explicit filesystem Ray wants the path without scheme (``bucket/prefix``); local
    runs get an absolute path and no filesystem. Note: Ray ships the filesystem to workers by
    pickling, and pyarrow's pickle drops ``retry_strategy``, so workers retry with pyarrow's
    default (3 attempts, standard backoff) rather than ``s3.max_attempts``.
    """
    loc = parse_uri(uri)
    if loc.is_s3:
        return f"{loc.bucket}/{loc.key}".rstrip("/"), s3_filesystem(s3cfg)
    return loc.key, None


class RetryCounter:
    """Counts retried S3 requests (thread-safe) by error code, across all clients made here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] = self._counts.get(kind, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


# Process-wide: the driver reports it next to its metrics.
retry_counts = RetryCounter()


def _count_retry(attempts: int | None = None, response: Any = None, caught_exception: Any = None, **_: Any) -> None:
    # botocore emits "needs-retry" after every attempt; count the ones that will be retried.
    if caught_exception is not None:
        kind = type(caught_exception).__name__
    elif response is not None:
        http, parsed = response
        code = (parsed or {}).get("Error", {}).get("Code") or str(getattr(http, "status_code", ""))
        status = getattr(http, "status_code", 200)
        if status < 500 and code not in TRANSIENT_CODES:
            return
        kind = code or str(status)
    else:
        return
    retry_counts.add(kind)


def s3_client(s3cfg: "S3Config | None" = None):
    """A boto3 S3 client: endpoint, region, addressing style, standard-mode retries, timeouts.

    Transient failures that botocore retries are counted in ``retry_counts``.
    """
    import boto3
    from botocore.config import Config as BotoConfig

    s3cfg = s3cfg or _default_s3cfg()
    creds = resolve_credentials(s3cfg)
    session = boto3.Session(profile_name=s3cfg.profile) if (s3cfg.profile and not creds.access_key) else boto3.Session()
    config = BotoConfig(
        region_name=s3cfg.region or session.region_name or "us-east-1",
        # total_max_attempts counts the first try (botocore's "max_attempts" counts retries only).
        retries={"mode": "standard", "total_max_attempts": s3cfg.max_attempts},
        connect_timeout=s3cfg.connect_timeout_s,
        read_timeout=s3cfg.read_timeout_s,
        s3={"addressing_style": s3cfg.addressing_style},
    )
    client = session.client(
        "s3",
        endpoint_url=s3cfg.endpoint_url,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        aws_session_token=creds.token,
        config=config,
    )
    client.meta.events.register("needs-retry.s3", _count_retry_if_retrying(client))
    return client


def _count_retry_if_retrying(client: Any):
    """Wrap the counter so that only attempts botocore will actually retry are counted."""
    max_attempts = client.meta.config.retries.get("total_max_attempts") or client.meta.config.retries.get("max_attempts", 1)

    def hook(attempts: int = 1, **kw: Any) -> None:
        if attempts < max_attempts:
            _count_retry(attempts=attempts, **kw)

    return hook


# ---------------------------------------------------------------------------------------------
# Checks with clear errors


def _explain_client_error(e: Exception, uri: str, s3cfg: "S3Config | None", action: str) -> StorageError:
    import botocore.exceptions as bex

    s3cfg = s3cfg or _default_s3cfg()
    where = redact_uri(uri)
    endpoint = redact_uri(s3cfg.endpoint_url) if s3cfg.endpoint_url else "the default AWS endpoint"
    if isinstance(e, bex.NoCredentialsError):
        return StorageError(
            f"cannot {action} {where}: no S3 credentials found. Fix: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or s3.access_key_id/s3.secret_access_key, or s3.profile)"
        )
    if isinstance(e, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError)):
        return StorageError(
            f"cannot {action} {where}: no S3 service answers at {endpoint}. Fix: check s3.endpoint_url "
            "(scheme http/https, host, port) and that the server is running"
        )
    if isinstance(e, bex.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket", "404", "NotFound") and action != "read object":
            return StorageError(
                f"cannot {action} {where}: bucket {parse_uri(uri).bucket!r} does not exist at {endpoint}. "
                "Fix: create it (e.g. `aws s3 mb`) or correct the bucket name / s3.endpoint_url"
            )
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "InvalidClientTokenId"):
            return StorageError(
                f"cannot {action} {where}: the S3 credentials were rejected ({code}). Fix: check "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or s3.access_key_id/s3.secret_access_key) "
                "and that they belong to this endpoint"
            )
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
            return StorageError(
                f"cannot {action} {where}: access denied ({code or status}). Fix: grant these credentials "
                f"s3:ListBucket/s3:GetObject{'/s3:PutObject' if 'write' in action else ''} on the bucket, "
                "or use credentials that have them"
            )
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "301", "400") and status in (301, 400):
            return StorageError(
                f"cannot {action} {where}: the bucket is in another region ({code}). Fix: set s3.region "
                "to the bucket's region"
            )
        if code in TRANSIENT_CODES or (status or 0) >= 500:
            return StorageError(
                f"cannot {action} {where}: S3 error {code or status} persisted through s3.max_attempts="
                f"{s3cfg.max_attempts} attempts (throttling or server trouble at {endpoint}). Fix: retry later, "
                "reduce the request rate, or raise s3.max_attempts"
            )
        return StorageError(f"cannot {action} {where}: S3 error {code or status}. Check the s3.* settings")
    return StorageError(f"cannot {action} {where}: {type(e).__name__}: {_scrub(str(e), s3cfg)}")


def _scrub(text: str, s3cfg: "S3Config | None") -> str:
    """Remove any configured secret from a message we did not write ourselves."""
    if s3cfg is None:
        return text
    for s in (s3cfg.access_key_id, s3cfg.secret_access_key, s3cfg.session_token):
        if s is not None and s.get_secret_value():
            text = text.replace(s.get_secret_value(), "***")
    for env in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        v = os.environ.get(env)
        if v and len(v) >= 8:
            text = text.replace(v, "***")
    return text


def check_readable(uri: str, s3cfg: "S3Config | None" = None, *, require_objects: bool = True) -> None:
    """Raise ``StorageError`` unless ``uri`` exists and (with ``require_objects``) holds files."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        p = Path(loc.key)
        if not p.exists():
            raise StorageError(f"{loc.key} does not exist. Fix: check the path (it is resolved on the driver machine)")
        if p.is_dir() and require_objects and not any(p.iterdir()):
            raise StorageError(f"{loc.key} is an empty directory. Fix: point at the directory holding the data")
        if not os.access(p, os.R_OK):
            raise StorageError(f"{loc.key} is not readable by this user. Fix: check its permissions")
        return
    client = s3_client(s3cfg)
    try:
        # ListObjects rather than HeadBucket: a HEAD error has no body, so S3 cannot tell us
        # whether a 403 means bad keys or a missing permission.
        prefix = f"{loc.key}" if loc.key else ""
        resp = client.list_objects_v2(Bucket=loc.bucket, Prefix=prefix, MaxKeys=1)
    except Exception as e:  # noqa: BLE001 - translated into a message with the fix
        raise _explain_client_error(e, uri, s3cfg, "read") from None
    if require_objects and not resp.get("KeyCount"):
        raise StorageError(
            f"{loc.uri()} holds no objects (empty prefix). Fix: check the prefix spelling, or upload data "
            "first (`raydiff data upload SRC s3://...`)"
        )


def check_writable(uri: str, s3cfg: "S3Config | None" = None) -> None:
    """Raise ``StorageError`` unless a small object can be written (and deleted) under ``uri``."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        p = Path(loc.key)
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / ".raydiff-write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise StorageError(f"cannot write to {loc.key}: {e.strerror or e}. Fix: choose a writable directory") from None
        return
    client = s3_client(s3cfg)
    key = f"{loc.key}/.raydiff-write-probe".lstrip("/")
    try:
        client.put_object(Bucket=loc.bucket, Key=key, Body=b"ok")
        client.delete_object(Bucket=loc.bucket, Key=key)
    except Exception as e:  # noqa: BLE001
        raise _explain_client_error(e, uri, s3cfg, "write to") from None


# ---------------------------------------------------------------------------------------------
# Small files in run directories (either backend)


def write_bytes(uri: str, data: bytes, s3cfg: "S3Config | None" = None) -> None:
    loc = parse_uri(uri)
    if loc.is_s3:
        try:
            s3_client(s3cfg).put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        except Exception as e:  # noqa: BLE001
            raise _explain_client_error(e, uri, s3cfg, "write to") from None
        return
    p = Path(loc.key)
    p.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename so that readers never see half a file.
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def read_bytes(uri: str, s3cfg: "S3Config | None" = None) -> bytes:
    loc = parse_uri(uri)
    if loc.is_s3:
        client = s3_client(s3cfg)
        try:
            return client.get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read()
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"{loc.uri()} does not exist") from None
        except Exception as e:  # noqa: BLE001
            raise _explain_client_error(e, uri, s3cfg, "read object") from None
    p = Path(loc.key)
    if not p.is_file():
        raise FileNotFoundError(f"{loc.key} does not exist")
    return p.read_bytes()


def append_text(uri: str, text: str, s3cfg: "S3Config | None" = None) -> None:
    """Append to a small text file. S3 has no append: read-modify-write (fine for logs of a few MB,
    single writer)."""
    loc = parse_uri(uri)
    if loc.is_s3:
        try:
            old = read_bytes(uri, s3cfg)
        except FileNotFoundError:
            old = b""
        write_bytes(uri, old + text.encode(), s3cfg)
        return
    p = Path(loc.key)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(text)


def exists(uri: str, s3cfg: "S3Config | None" = None) -> bool:
    """True for an existing file/object, or a directory/prefix that holds something."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        return Path(loc.key).exists()
    client = s3_client(s3cfg)
    try:
        if loc.key:
            try:
                client.head_object(Bucket=loc.bucket, Key=loc.key)
                return True
            except client.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                    raise
        resp = client.list_objects_v2(Bucket=loc.bucket, Prefix=f"{loc.key}/" if loc.key else "", MaxKeys=1)
        return bool(resp.get("KeyCount"))
    except client.exceptions.NoSuchBucket:
        return False
    except Exception as e:  # noqa: BLE001
        raise _explain_client_error(e, uri, s3cfg, "read") from None


def listdir(uri: str, s3cfg: "S3Config | None" = None) -> list[str]:
    """Sorted names directly under ``uri`` (files and sub-directories/prefixes, no trailing slash)."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        p = Path(loc.key)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    client = s3_client(s3cfg)
    prefix = f"{loc.key}/" if loc.key else ""
    names: set[str] = set()
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix, Delimiter="/"):
            for cp in page.get("CommonPrefixes", []):
                names.add(cp["Prefix"][len(prefix) :].rstrip("/"))
            for obj in page.get("Contents", []):
                names.add(obj["Key"][len(prefix) :])
    except Exception as e:  # noqa: BLE001
        raise _explain_client_error(e, uri, s3cfg, "list") from None
    return sorted(n for n in names if n)


def list_files(uri: str, s3cfg: "S3Config | None" = None) -> list[tuple[str, int]]:
    """All files below ``uri`` recursively as (path relative to uri, size in bytes), sorted."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        root = Path(loc.key)
        if root.is_file():
            return [(root.name, root.stat().st_size)]
        out = []
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                full = os.path.join(dirpath, f)
                out.append((os.path.relpath(full, root).replace(os.sep, "/"), os.path.getsize(full)))
        return sorted(out)
    client = s3_client(s3cfg)
    prefix = f"{loc.key}/" if loc.key else ""
    out = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if rel and not rel.endswith("/"):
                    out.append((rel, int(obj["Size"])))
    except Exception as e:  # noqa: BLE001
        raise _explain_client_error(e, uri, s3cfg, "list") from None
    if not out and loc.key:
        # The URI may name a single object rather than a prefix.
        try:
            h = client.head_object(Bucket=loc.bucket, Key=loc.key)
            return [(loc.key.rsplit("/", 1)[-1], int(h["ContentLength"]))]
        except Exception:  # noqa: BLE001 - not an object either: an empty listing
            pass
    return sorted(out)


_TRANSIENT_MARKERS = ("HTTP status 5", "SLOW_DOWN", "SlowDown", "THROTTL", "Throttl", "NETWORK_CONNECTION", "timed out", "Timeout", "TIMEOUT", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "Connection reset")


def is_transient(e: BaseException) -> bool:
    """Whether a pyarrow/OS error looks like throttling, a 5xx or a network hiccup."""
    if isinstance(e, FileNotFoundError):
        return False
    text = str(e)
    return isinstance(e, (TimeoutError, ConnectionError)) or any(m in text for m in _TRANSIENT_MARKERS)


def retry_call(fn, *, max_attempts: int, on_retry=None, base_delay_s: float = 0.1, max_delay_s: float = 5.0):
    """Call ``fn()``; on a transient error retry with full-jitter exponential backoff (the AWS
    SDK's standard policy), calling ``on_retry(exception)`` before each retry so callers can
    count them."""
    import random

    for attempt in range(1, max_attempts + 1):
        try:
            return fn()
        except OSError as e:
            if attempt >= max_attempts or not is_transient(e):
                raise
            if on_retry is not None:
                on_retry(e)
            time.sleep(random.uniform(0, min(max_delay_s, base_delay_s * 2**attempt)))
    raise AssertionError("unreachable")
