"""Compare-and-swap on one small object, the run lease (lease.py): a local file under ``flock``,
or an S3 object written with ``If-None-Match``/``If-Match`` (the module docstring of lease.py
says what each guarantees)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from orchestrator.storage.clients import s3_client
from orchestrator.storage.files import explain_client_error
from orchestrator.storage.uri import StorageError, join, parse_uri

if TYPE_CHECKING:
    from orchestrator.config import S3Config

log = logging.getLogger("raydiff")
LEASE_FILE = "lease.json"



class _LocalStore:
    def __init__(self, path: Path):
        self.path = path

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(".lease.lock"), "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            return self.path.read_bytes(), None
        except FileNotFoundError:
            return None, None
        except OSError as e:
            raise StorageError(f"cannot read {self.path}: {e.strerror or e}. Fix: check the run directory's permissions") from None

    def write(self, data: bytes, *, expect: str | None, create: bool) -> bool:
        # Under the lock nothing changes between read and write: the conditions hold.
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        except OSError as e:
            raise StorageError(f"cannot write {self.path}: {e.strerror or e}. Fix: check the run directory's permissions") from None
        return True

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


class _S3Store:
    def __init__(self, uri: str, s3cfg: "S3Config | None"):
        self.uri, self.s3cfg = uri, s3cfg
        loc = parse_uri(uri)
        self.bucket, self.key = loc.bucket, loc.key
        self.conditional = True

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        yield  # conditional writes instead of a lock

    def read(self) -> tuple[bytes | None, str | None]:
        client = s3_client(self.s3cfg)
        try:
            obj = client.get_object(Bucket=self.bucket, Key=self.key)
            return obj["Body"].read(), obj["ETag"]
        except client.exceptions.NoSuchKey:
            return None, None
        except Exception as e:  # noqa: BLE001 - translated into a message with the fix
            raise explain_client_error(e, self.uri, self.s3cfg, "read object") from None

    def write(self, data: bytes, *, expect: str | None, create: bool) -> bool:
        """False when the condition failed: someone else wrote the lease since we read it."""
        import botocore.exceptions as bex

        client = s3_client(self.s3cfg)
        cond: dict[str, str] = {}
        if self.conditional:
            cond = {"IfNoneMatch": "*"} if create else ({"IfMatch": expect} if expect else {})
        try:
            client.put_object(Bucket=self.bucket, Key=self.key, Body=data, ContentType="application/json", **cond)
            return True
        except bex.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            if cond and (code == "NotImplemented" or status == 501):
                log.warning("raydiff: %s does not support conditional writes; the run lease falls back to "
                            "write-then-read-back (see orchestrator/storage/lease.py)", self.uri)
                self.conditional = False
                return self.write(data, expect=expect, create=create)
            raise explain_client_error(e, self.uri, self.s3cfg, "write to") from None
        except Exception as e:  # noqa: BLE001
            raise explain_client_error(e, self.uri, self.s3cfg, "write to") from None

    def delete(self) -> None:
        try:
            s3_client(self.s3cfg).delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as e:  # noqa: BLE001
            raise explain_client_error(e, self.uri, self.s3cfg, "write to") from None


def _store(run_uri: str, s3cfg: "S3Config | None"):
    uri = join(run_uri, LEASE_FILE)
    loc = parse_uri(uri)
    return _S3Store(uri, s3cfg) if loc.is_s3 else _LocalStore(Path(loc.key))
