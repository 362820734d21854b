"""File operations on local paths and ``s3://`` URIs, with errors that name the fix.

Small files only (configs, metrics parts, grids, manifests): bulk data goes through pyarrow in
the data pipeline and checkpoints through Ray Train. Local writes are atomic (write, then
rename), so a reader never sees half a file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.storage.clients import s3_client
from orchestrator.storage.credentials import default_s3cfg, scrub
from orchestrator.storage.retry import TRANSIENT_CODES
from orchestrator.storage.uri import StorageError, parse_uri, redact_uri

if TYPE_CHECKING:
    from orchestrator.config import S3Config


def explain_client_error(e: Exception, uri: str, s3cfg: "S3Config | None", action: str) -> StorageError:
    import botocore.exceptions as bex

    s3cfg = s3cfg or default_s3cfg()
    where = redact_uri(uri)
    endpoint = redact_uri(s3cfg.endpoint_url) if s3cfg.endpoint_url else "the default AWS endpoint"
    if isinstance(e, bex.NoCredentialsError):
        return StorageError(
            f"cannot {action} {where}: no S3 credentials found. Fix: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or storage.s3.access_key_id/storage.s3.secret_access_key, or storage.s3.profile)"
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
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or storage.s3.access_key_id/storage.s3.secret_access_key) "
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
                f"cannot {action} {where}: S3 error {code or status} persisted through storage.s3.max_attempts="
                f"{s3cfg.max_attempts} attempts (throttling or server trouble at {endpoint}). Fix: retry later, "
                "reduce the request rate, or raise storage.s3.max_attempts"
            )
        return StorageError(f"cannot {action} {where}: S3 error {code or status}. Check the s3.* settings")
    return StorageError(f"cannot {action} {where}: {type(e).__name__}: {scrub(str(e), s3cfg)}")


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
        raise explain_client_error(e, uri, s3cfg, "read") from None
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
        raise explain_client_error(e, uri, s3cfg, "write to") from None


# ---------------------------------------------------------------------------------------------
# Small files in run directories (either backend)


def write_bytes(uri: str, data: bytes, s3cfg: "S3Config | None" = None) -> None:
    loc = parse_uri(uri)
    if loc.is_s3:
        try:
            s3_client(s3cfg).put_object(Bucket=loc.bucket, Key=loc.key, Body=data)
        except Exception as e:  # noqa: BLE001
            raise explain_client_error(e, uri, s3cfg, "write to") from None
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
            raise explain_client_error(e, uri, s3cfg, "read object") from None
    p = Path(loc.key)
    if not p.is_file():
        raise FileNotFoundError(f"{loc.key} does not exist")
    return p.read_bytes()


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
        raise explain_client_error(e, uri, s3cfg, "read") from None


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
        raise explain_client_error(e, uri, s3cfg, "list") from None
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
        raise explain_client_error(e, uri, s3cfg, "list") from None
    if not out and loc.key:
        # The URI may name a single object rather than a prefix.
        try:
            h = client.head_object(Bucket=loc.bucket, Key=loc.key)
            return [(loc.key.rsplit("/", 1)[-1], int(h["ContentLength"]))]
        except Exception:  # noqa: BLE001 - not an object either: an empty listing
            pass
    return sorted(out)


def delete(uri: str, s3cfg: "S3Config | None" = None) -> None:
    """Remove one file/object; a missing one is not an error."""
    loc = parse_uri(uri)
    if not loc.is_s3:
        Path(loc.key).unlink(missing_ok=True)
        return
    try:
        s3_client(s3cfg).delete_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as e:  # noqa: BLE001
        raise explain_client_error(e, uri, s3cfg, "write to") from None


def read_many(uris: list[str], s3cfg: "S3Config | None" = None, *, threads: int = 8) -> list[bytes | None]:
    """``read_bytes`` of each URI, in order, None for one that does not exist; on S3 several
    requests at a time (botocore's connection pool holds 10 by default, so at most 8 threads
    share the process's client)."""

    def one(u: str) -> bytes | None:
        try:
            return read_bytes(u, s3cfg)
        except FileNotFoundError:
            return None

    if len(uris) < 2 or not parse_uri(uris[0]).is_s3:
        return [one(u) for u in uris]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(uris))) as pool:
        return list(pool.map(one, uris))


def delete_many(uris: list[str], s3cfg: "S3Config | None" = None) -> None:
    """``delete`` of each URI; on S3 one request per 1,000 objects of a bucket (DeleteObjects)."""
    by_bucket: dict[str, list[str]] = {}
    for u in uris:
        loc = parse_uri(u)
        if not loc.is_s3:
            Path(loc.key).unlink(missing_ok=True)
            continue
        by_bucket.setdefault(loc.bucket, []).append(loc.key)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            try:
                resp = s3_client(s3cfg).delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})
            except Exception as e:  # noqa: BLE001
                raise explain_client_error(e, f"s3://{bucket}/{keys[i]}", s3cfg, "write to") from None
            if resp.get("Errors"):
                err = resp["Errors"][0]
                raise StorageError(f"could not delete s3://{bucket}/{err['Key']}: {err.get('Code')} "
                                   f"{err.get('Message', '')}. Fix: check the credentials' delete permission")
