"""``raydiff data serve-s3``: a local S3-compatible server (moto) on 127.0.0.1 for demos.

moto is optional (``pip install 'raydiff[serve-s3]'``; the dev extra has it too): it is imported
only here, when the command runs, and its absence is reported as a one-line ``StorageError``.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from orchestrator.storage import StorageError

MOTO_MISSING = "raydiff data serve-s3 needs moto: pip install 'raydiff[serve-s3]'"


def moto_s3_server_class():
    """moto's ``ThreadedMotoServer`` serving only its S3 app (tests/s3_server.py uses it too).

    moto's default app serves every AWS service and picks one per request: for a request to an
    endpoint URL (no AWS host name) it parses the signature, lists moto's modules on disk and tries
    every service's URL patterns, about half of the server's CPU per S3 request (py-spy,
    2026-12-06, issue 18: 2.6 -> 1.4 ms per GET on this 2-core machine). Same server and S3 app,
    minus that choice."""
    try:
        from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
        from moto.server import ThreadedMotoServer
        from werkzeug.serving import make_server
    except ImportError:  # moto, or its [server] extra (flask, werkzeug), is not installed
        raise StorageError(MOTO_MISSING) from None

    class S3MotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            self._server = make_server(self._ip_address, self._port, create_backend_app("s3"), True,
                                       request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    return S3MotoServer


def _restore(client, root: Path) -> int:
    n = 0
    for bucket_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        client.create_bucket(Bucket=bucket_dir.name)
        for f in sorted(bucket_dir.rglob("*")):
            if f.is_file():
                client.put_object(Bucket=bucket_dir.name, Key=f.relative_to(bucket_dir).as_posix(), Body=f.read_bytes())
                n += 1
    return n


def _snapshot(client, root: Path, out) -> int:
    """Write every object to ``root/<bucket>/<key>``; returns the number of objects written.

    S3 keys are not paths: a zero-byte "folder marker" key ending in ``/`` becomes a directory,
    and a key that collides with a directory of another key's prefix (``a`` beside ``a/b``)
    cannot be represented on a file system, so it is reported by name and left out instead of
    aborting the save and losing every object after it.
    """
    n = 0
    for b in client.list_buckets().get("Buckets", []):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                target = root / b["Name"] / key
                try:
                    if key.endswith("/"):
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(client.get_object(Bucket=b["Name"], Key=key)["Body"].read())
                except (FileExistsError, IsADirectoryError, NotADirectoryError):
                    print(f"not saved: s3://{b['Name']}/{key} (the key clashes with a folder of the same name)", file=out, flush=True)
                    continue
                n += 1
    return n


def serve_s3(port: int, directory: str | None, buckets: list[str], *, stop: threading.Event | None = None, out=None) -> None:
    """A local S3 (moto) on 127.0.0.1 for demos, until Ctrl-C (or ``stop`` is set).

    moto keeps objects in memory. With ``directory`` the store is restored from it at start
    (``DIR/<bucket>/<key>`` files) and written back on a clean exit: best-effort persistence,
    lost if the process is killed hard. Not for production data.
    """
    server_cls = moto_s3_server_class()
    import boto3

    out = out or sys.stdout
    server = server_cls(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto accepts any key; these fixed dummy values are not secrets.
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    root = Path(directory) if directory else None
    try:
        restored = _restore(client, root) if root and root.is_dir() else 0
        for b in buckets:
            try:
                client.create_bucket(Bucket=b)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
        bucket = buckets[0] if buckets else "BUCKET"
        print(
            f"local S3 (moto) at {endpoint}" + (f", {restored} objects restored from {root}" if root else "") + "\n"
            "use it with:\n"
            "  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1\n"
            f"  raydiff data upload DIR s3://{bucket}/dataset --endpoint-url {endpoint}\n"
            f"  raydiff train data.source=s3://{bucket}/dataset storage.s3.endpoint_url={endpoint} "
            f"run.storage=s3://{bucket}/runs\n"
            "Ctrl-C stops it" + (f" and saves the objects to {root}" if root else " (objects are kept in memory only)"),
            file=out,
            flush=True,
        )
        while not (stop.wait(0.2) if stop else time.sleep(0.5)):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if root:
            root.mkdir(parents=True, exist_ok=True)
            n = _snapshot(client, root, out)
            print(f"saved {n} objects to {root}", file=out, flush=True)
        server.stop()
