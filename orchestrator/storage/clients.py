"""S3 clients (boto3 for small control-plane calls and run files, pyarrow for bulk data and
Ray Train checkpoints), built from ``S3Config`` and cached per process and per settings.

Building a boto3 client costs milliseconds and resolving the credential chain may call the
instance metadata service; a run writes thousands of small objects, so clients are made once.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from orchestrator.storage.credentials import default_s3cfg, resolve_credentials
from orchestrator.storage.retry import botocore_retry_hook
from orchestrator.storage.uri import parse_uri

if TYPE_CHECKING:
    from orchestrator.config import S3Config

_lock = threading.Lock()
_boto_clients: dict[tuple, Any] = {}


def _settings_key(s3cfg: "S3Config") -> tuple:
    # Secrets are part of the key (in memory only): other keys must get another client.
    return tuple(v.get_secret_value() if hasattr(v, "get_secret_value") else v
                 for v in (getattr(s3cfg, f) for f in type(s3cfg).model_fields))


def _endpoint_parts(endpoint_url: str | None) -> tuple[str | None, str | None]:
    if not endpoint_url:
        return None, None
    p = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
    return p.netloc, p.scheme


def s3_client(s3cfg: "S3Config | None" = None):
    """The process's boto3 S3 client for these settings: endpoint, region, addressing style,
    standard-mode retries (counted in ``retry_counts``), timeouts."""
    s3cfg = s3cfg or default_s3cfg()
    key = _settings_key(s3cfg)
    with _lock:
        client = _boto_clients.get(key)
        if client is None:
            client = _boto_clients[key] = _make_s3_client(s3cfg)
    return client


def _make_s3_client(s3cfg: "S3Config"):
    import boto3
    from botocore.config import Config as BotoConfig

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
    client.meta.events.register("needs-retry.s3", botocore_retry_hook(s3cfg.max_attempts))
    return client


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


CREDENTIAL_KWARGS = ("access_key", "secret_key", "session_token")


def s3_filesystem_kwargs(s3cfg: "S3Config | None") -> tuple[dict[str, Any], dict[str, Any]]:
    """``S3FileSystem`` keyword arguments as ``(endpoint/region/timeouts, credentials)``."""
    kw = _s3_kwargs(s3cfg or default_s3cfg())
    creds = {k: kw.pop(k) for k in CREDENTIAL_KWARGS if k in kw}
    return kw, {k: v for k, v in creds.items() if v is not None}


def s3_filesystem(s3cfg: "S3Config | None", *, max_attempts: int | None = None) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem with the config's endpoint, region, retries and timeouts.

    ``max_attempts=1`` turns pyarrow's own (invisible) retries off, for callers that retry and
    count themselves (``retry_call``).
    """
    s3cfg = s3cfg or default_s3cfg()
    # The SDK's standard mode: exponential backoff with jitter on throttling/5xx/timeouts.
    retry = pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts or s3cfg.max_attempts)
    return pafs.S3FileSystem(retry_strategy=retry, **_s3_kwargs(s3cfg))


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
    s3cfg = s3cfg or default_s3cfg()
    return FsHandle(_s3_kwargs(s3cfg), max_attempts or s3cfg.max_attempts)


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
    runs get an absolute path and no filesystem. Ray ships the filesystem to workers by
    pickling, and pyarrow's pickle drops ``retry_strategy``, so checkpoint uploads retry with
    pyarrow's default (3 attempts, standard backoff), uncounted, rather than ``storage.s3.max_attempts``.
    """
    loc = parse_uri(uri)
    if loc.is_s3:
        return f"{loc.bucket}/{loc.key}".rstrip("/"), s3_filesystem(s3cfg)
    return loc.key, None
