"""Local paths and ``s3://bucket/prefix`` URIs behind one small API.

Everything that touches run directories or datasets goes through here, so S3 settings
(endpoint, region, addressing style, retries, timeouts, credentials) apply the same way to
boto3 (small control-plane calls, checks, run files) and pyarrow (bulk reads by Ray Data,
Ray Train checkpoints). Credentials are held in memory only: nothing here logs, prints, stores
or puts them in an exception.

Modules, one concern each:

- ``uri``: parsing, joining and redacting locations; ``StorageError``.
- ``credentials``: the credential chain and the log filter that scrubs secrets.
- ``clients``: boto3 clients and pyarrow filesystems, cached per process and settings.
- ``retry``: one retry layer per request path, every retry counted in ``retry_counts``.
- ``files``: small-file operations and checks whose errors name the fix.
- ``jsonl``: append-only logs that write new objects instead of rewriting old ones.
- ``rundir``: the run directory view used by training, sampling and reports.
- ``lease``: one writer per run (``lease.json`` with expiry; conditional writes on S3).
- ``lease_store``: the lease's compare-and-swap (a locked local file, conditional S3 writes).
- ``fence``: no write by a lease holder once its lease was taken over.
- ``local_server``: a local S3 server (moto) for demos.

Callers import from this package, never from the modules.
"""

from orchestrator.storage.clients import (
    FsHandle,
    filesystem_for,
    ray_storage,
    resolve_fs,
    s3_client,
    s3_filesystem,
    s3_filesystem_handle,
)
from orchestrator.storage.credentials import resolve_credentials
from orchestrator.storage.files import (
    check_readable,
    check_writable,
    delete,
    exists,
    explain_client_error,
    list_files,
    listdir,
    read_bytes,
    write_bytes,
)
from orchestrator.storage.jsonl import JsonlLog, read_records, supersede
from orchestrator.storage.fence import Fence, fenced_rundir
from orchestrator.storage.lease import (
    LEASE_LOST_EXIT,
    Lease,
    LeaseHeld,
    LeaseLost,
    acquire_lease,
    describe_holder,
    lease_lost_line,
    read_lease,
)
from orchestrator.storage.retry import TRANSIENT_CODES, RetryCounter, is_transient, retry_call, retry_counts
from orchestrator.storage.rundir import RunDir
from orchestrator.storage.uri import Location, StorageError, join, parse_uri, redact_uri

__all__ = [
    "Fence", "fenced_rundir", "FsHandle", "JsonlLog", "LEASE_LOST_EXIT", "lease_lost_line", "Location", "RetryCounter", "RunDir", "StorageError", "TRANSIENT_CODES",
    "check_readable", "check_writable", "delete", "exists", "explain_client_error", "filesystem_for",
    "is_transient", "join", "list_files", "listdir", "parse_uri", "ray_storage", "read_bytes",
    "Lease", "LeaseHeld", "LeaseLost", "acquire_lease", "describe_holder", "read_lease",
    "read_records", "redact_uri", "resolve_credentials", "resolve_fs", "retry_call", "retry_counts",
    "s3_client", "s3_filesystem", "s3_filesystem_handle", "supersede", "write_bytes",
]
