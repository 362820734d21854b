"""A local S3 for tests: moto's threaded server on 127.0.0.1, plus a fault-injecting proxy.

moto accepts any credentials and never fails on its own, so the failure modes that matter in
production (throttling, 5xx, wrong keys, access denied) come from a small reverse proxy that sits
in front of moto and answers some requests itself with the XML error bodies real S3 sends. The
clients under test (botocore, pyarrow's AWS C++ SDK) talk real HTTP to it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable

import boto3

from orchestrator.storage.local_server import moto_s3_server_class

DUMMY_ACCESS_KEY = "testing"
DUMMY_SECRET_KEY = "testing"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's S3 server on loopback (its default address is 0.0.0.0, never use that)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server = moto_s3_server_class()(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def client(self, endpoint_url: str | None = None):
        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=DUMMY_ACCESS_KEY,
            aws_secret_access_key=DUMMY_SECRET_KEY,
        )

    def create_bucket(self, name: str) -> str:
        """Create (idempotently) and return ``name``."""
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name


class MotoS3Process:
    """moto's server in a child process, started holding ``objects`` ((bucket, key, body) triples,
    put straight into its store). For tests that send tens of thousands of requests: in the test's
    process moto's request handling (about 2.3 ms of CPU per GET here) shares one interpreter with
    the client; in its own it runs on the other core (20,000 GETs: 92 s in-process, issue 18).
    ``with MotoS3Process(objects) as s3: ... s3.endpoint_url``."""

    def __init__(self, objects: Iterable[tuple[str, str, bytes]]) -> None:
        self._objects = objects
        self._proc: subprocess.Popen | None = None
        self.endpoint_url = ""

    def __enter__(self) -> "MotoS3Process":
        root = str(Path(__file__).resolve().parents[1])  # the child imports orchestrator from this checkout
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env=env)
        try:
            for bucket, key, body in self._objects:
                self._proc.stdin.write(json.dumps([bucket, key, body.decode("latin-1")]) + "\n")
            self._proc.stdin.write("\n")  # the objects end here
            self._proc.stdin.flush()
            port = self._proc.stdout.readline().strip()
            if not port.isdigit():
                raise RuntimeError(f"moto's child process did not start (exit code {self._proc.poll()})")
        except BaseException:
            self.__exit__()
            raise
        self.endpoint_url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.stdin.close()  # the child stops its server and exits
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def _serve_seeded() -> None:
    """MotoS3Process's child: put the objects read from stdin, print the port, serve until stdin closes."""
    import logging

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = MotoS3().start()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    buckets: set[str] = set()
    try:
        for line in sys.stdin:
            if line == "\n":
                break
            bucket, key, body = json.loads(line)
            if bucket not in buckets:
                backend.create_bucket(bucket, REGION)
                buckets.add(bucket)
            backend.put_object(bucket, key, body.encode("latin-1"))
        print(server.port, flush=True)
        sys.stdin.read()
    finally:
        server.stop()


_ACCESS_KEY_RE = re.compile(r"Credential=([^/,\s]+)/")


@dataclass
class FaultPlan:
    """What the proxy does; mutate it from a test (guarded by ``lock``)."""

    # Answer the next N requests with 503 SlowDown (throttling) ...
    fail_next: int = 0
    status: int = 503
    code: str = "SlowDown"
    # ... only requests whose path starts with this (None: any request).
    fail_path_prefix: str | None = None
    # Access keys that the "real" S3 behind the proxy knows; None: any key.
    valid_access_keys: set[str] | None = None
    # Buckets whose every request is denied (a bucket policy the caller is not allowed by).
    denied_buckets: set[str] = field(default_factory=set)
    requests_seen: int = 0
    faults_sent: int = 0
    # Request bodies that reached the proxy, per HTTP method (PUT = object writes).
    requests_by_method: dict[str, int] = field(default_factory=dict)
    bytes_by_method: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _error_xml(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>proxy</RequestId></Error>"
    ).encode()


class FaultProxy:
    """HTTP reverse proxy to moto on 127.0.0.1 that injects S3 errors per ``plan``."""

    def __init__(self, upstream_port: int, port: int | None = None) -> None:
        self.plan = FaultPlan()
        self.upstream_port = upstream_port
        plan = self.plan

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with plan.lock:
                    plan.requests_by_method[self.command] = plan.requests_by_method.get(self.command, 0) + 1
                    plan.bytes_by_method[self.command] = plan.bytes_by_method.get(self.command, 0) + len(body)
                verdict = self._fault()
                if verdict is not None:
                    status, code, msg = verdict
                    self._reply(status, {"Content-Type": "application/xml"}, _error_xml(code, msg))
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                out = {
                    k: v
                    for k, v in resp.getheaders()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length")
                }
                length_header = resp.getheader("Content-Length") if self.command == "HEAD" else None
                conn.close()
                # A HEAD reply has no body but must carry the object's real Content-Length.
                self._reply(resp.status, out, data, length_header)

            def _fault(self) -> tuple[int, str, str] | None:
                with plan.lock:
                    plan.requests_seen += 1
                    m = _ACCESS_KEY_RE.search(self.headers.get("Authorization", ""))
                    key = m.group(1) if m else None
                    if plan.valid_access_keys is not None and key not in plan.valid_access_keys:
                        plan.faults_sent += 1
                        return 403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
                    bucket = self.path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
                    if bucket in plan.denied_buckets:
                        plan.faults_sent += 1
                        return 403, "AccessDenied", "Access Denied"
                    if plan.fail_next > 0 and (
                        plan.fail_path_prefix is None or self.path.startswith(plan.fail_path_prefix)
                    ):
                        plan.fail_next -= 1
                        plan.faults_sent += 1
                        return plan.status, plan.code, "Please reduce your request rate."
                return None

            def _reply(self, status: int, headers: dict[str, str], data: bytes, length: str | None = None) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", length if length is not None else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.port = port or free_port()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def reset(self) -> None:
        with self.plan.lock:
            self.plan.fail_next = 0
            self.plan.status, self.plan.code = 503, "SlowDown"
            self.plan.fail_path_prefix = None
            self.plan.valid_access_keys = None
            self.plan.denied_buckets = set()
            self.plan.requests_seen = self.plan.faults_sent = 0
            self.plan.requests_by_method, self.plan.bytes_by_method = {}, {}


if __name__ == "__main__":
    _serve_seeded()
