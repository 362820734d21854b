"""orchestrator.storage against local disk, a local moto S3, and a fault-injecting proxy."""

from __future__ import annotations

import logging
import uuid

import pyarrow.fs as pafs
import pytest
from pydantic import SecretStr
from s3_server import free_port

from orchestrator import storage
from orchestrator.config import DataConfig, S3Config
from orchestrator.data import DataError, inspect_dataset
from orchestrator.storage import StorageError


def _bucket(s3_server) -> str:
    return s3_server.create_bucket(f"b-{uuid.uuid4().hex[:10]}")


def test_parse_and_redact():
    loc = storage.parse_uri("s3://bkt/a/b/")
    assert (loc.scheme, loc.bucket, loc.key, loc.uri()) == ("s3", "bkt", "a/b", "s3://bkt/a/b")
    assert storage.parse_uri("relative/dir").key.startswith("/")
    assert storage.redact_uri("http://user:pw@host:9000/x?token=abc") == "http://host:9000/x"
    with pytest.raises(StorageError, match="credentials inside the URI"):
        storage.parse_uri("s3://key:secret@bucket/x")
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        storage.parse_uri("gs://bucket/x")


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_run_dir_helpers(backend, tmp_path, s3_server):
    if backend == "s3":
        base, cfg = f"s3://{_bucket(s3_server)}/runs/r1", s3_server.s3_config()
    else:
        base, cfg = str(tmp_path / "runs" / "r1"), None
    assert not storage.exists(base, cfg)
    storage.check_writable(base, cfg)
    storage.write_bytes(storage.join(base, "a.bin"), b"\x00\x01", cfg)
    storage.write_bytes(storage.join(base, "sub/c.txt"), b"c", cfg)
    assert storage.read_bytes(storage.join(base, "a.bin"), cfg) == b"\x00\x01"
    assert storage.exists(base, cfg) and storage.exists(storage.join(base, "sub"), cfg)
    assert storage.exists(storage.join(base, "a.bin"), cfg)
    assert not storage.exists(storage.join(base, "zzz"), cfg)
    assert storage.listdir(base, cfg) == ["a.bin", "sub"]
    assert storage.list_files(base, cfg) == [("a.bin", 2), ("sub/c.txt", 1)]
    storage.delete(storage.join(base, "a.bin"), cfg)
    storage.delete(storage.join(base, "a.bin"), cfg)  # already gone: not an error
    assert storage.listdir(base, cfg) == ["sub"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "missing"), cfg)
    storage.check_readable(base, cfg)


def test_ray_storage(tmp_path, s3_server):
    path, fs = storage.ray_storage(str(tmp_path / "runs"))
    assert path == str(tmp_path / "runs") and fs is None
    bucket = _bucket(s3_server)
    path, fs = storage.ray_storage(f"s3://{bucket}/runs/", s3_server.s3_config())
    assert path == f"{bucket}/runs" and isinstance(fs, pafs.S3FileSystem)
    # The filesystem Ray Train would use really reaches the store.
    with fs.open_output_stream(f"{path}/x/probe.txt") as f:
        f.write(b"hello")
    assert storage.read_bytes(f"s3://{bucket}/runs/x/probe.txt", s3_server.s3_config()) == b"hello"


def test_missing_bucket_and_empty_prefix(s3_server):
    cfg = s3_server.s3_config()
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-x' does not exist.*Fix"):
        storage.check_readable("s3://no-such-bucket-x/data", cfg)
    bucket = _bucket(s3_server)
    with pytest.raises(StorageError, match=r"s3://.*/empty holds no objects \(empty prefix\)"):
        storage.check_readable(f"s3://{bucket}/empty", cfg)
    with pytest.raises(DataError, match="does not exist"):
        inspect_dataset(DataConfig(source="s3://no-such-bucket-x/data").with_storage(cfg))
    with pytest.raises(DataError, match="empty prefix"):
        inspect_dataset(DataConfig(source=f"s3://{bucket}/empty").with_storage(cfg))


def test_wrong_endpoint():
    cfg = S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", max_attempts=1, connect_timeout_s=2)
    with pytest.raises(StorageError, match=r"no S3 service answers at http://127\.0\.0\.1:\d+.*s3\.endpoint_url"):
        storage.check_readable("s3://bucket/x", cfg)
    with pytest.raises(DataError, match="no S3 service answers"):
        inspect_dataset(DataConfig(source="s3://bucket/x").with_storage(cfg))


def test_wrong_credentials_and_access_denied(s3_server, s3_faults):
    bucket = _bucket(s3_server)
    s3_server.client().put_object(Bucket=bucket, Key="d/x.png", Body=b"x")
    s3_faults.plan.valid_access_keys = {s3_server.access_key}
    bad = S3Config(endpoint_url=s3_faults.endpoint_url, region="us-east-1", access_key_id=SecretStr("AKIAWRONG"), secret_access_key=SecretStr("wrong-secret-value"))
    with pytest.raises(StorageError, match=r"credentials were rejected \(InvalidAccessKeyId\).*AWS_ACCESS_KEY_ID"):
        storage.check_readable(f"s3://{bucket}/d", bad)
    good = S3Config(endpoint_url=s3_faults.endpoint_url, region="us-east-1")
    storage.check_readable(f"s3://{bucket}/d", good)  # the proxy passes the right key through
    s3_faults.plan.denied_buckets = {bucket}
    with pytest.raises(StorageError, match=r"access denied.*s3:GetObject"):
        storage.check_readable(f"s3://{bucket}/d", good)
    with pytest.raises(StorageError, match=r"access denied.*s3:PutObject"):
        storage.check_writable(f"s3://{bucket}/runs", good)
    with pytest.raises(DataError, match="access denied"):
        inspect_dataset(DataConfig(source=f"s3://{bucket}/d").with_storage(good))


def test_missing_credentials(monkeypatch, s3_server, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match="no S3 credentials found.*AWS_ACCESS_KEY_ID"):
        storage.check_readable("s3://bucket/x", s3_server.s3_config(max_attempts=1))
    with pytest.raises(StorageError, match="half set"):
        storage.resolve_credentials(S3Config(access_key_id=SecretStr("a")))
    with pytest.raises(StorageError, match="profile 'nope'"):
        storage.resolve_credentials(S3Config(profile="nope"))


def test_transient_errors_are_retried_and_counted(s3_server, s3_faults):
    bucket = _bucket(s3_server)
    s3_server.client().put_object(Bucket=bucket, Key="k/obj", Body=b"payload")
    cfg = S3Config(endpoint_url=s3_faults.endpoint_url, region="us-east-1", max_attempts=5)
    storage.retry_counts.reset()
    s3_faults.plan.fail_next = 2  # 503 SlowDown twice, then through
    assert storage.read_bytes(f"s3://{bucket}/k/obj", cfg) == b"payload"
    assert s3_faults.plan.faults_sent == 2
    assert storage.retry_counts.snapshot() == {"SlowDown": 2}
    s3_faults.plan.status, s3_faults.plan.code, s3_faults.plan.fail_next = 500, "InternalError", 1
    storage.write_bytes(f"s3://{bucket}/k/new", b"v", cfg)
    assert storage.retry_counts.snapshot() == {"SlowDown": 2, "InternalError": 1}
    # Out of attempts: a clear error, not a hang.
    s3_faults.plan.status, s3_faults.plan.code, s3_faults.plan.fail_next = 503, "SlowDown", 100
    sent = s3_faults.plan.faults_sent
    with pytest.raises(StorageError, match="S3 error SlowDown"):
        storage.read_bytes(f"s3://{bucket}/k/obj", cfg.model_copy(update={"max_attempts": 2}))
    assert s3_faults.plan.faults_sent - sent == 2  # s3.max_attempts counts the first try


def test_secrets_never_in_messages_or_logs(s3_server, s3_faults, caplog, capsys):
    planted_key, planted_secret = "AKIAPLANTEDKEY123", "PLANTED-SECRET-d8f7a6s5"
    cfg = S3Config(
        endpoint_url=s3_faults.endpoint_url,
        region="us-east-1",
        access_key_id=SecretStr(planted_key),
        secret_access_key=SecretStr(planted_secret),
        session_token=SecretStr(planted_secret + "-token"),
        max_attempts=1,
    )
    s3_faults.plan.valid_access_keys = {s3_server.access_key}
    caplog.set_level(logging.DEBUG)
    messages = []
    for fn in (storage.check_readable, storage.check_writable, storage.exists, storage.listdir):
        with pytest.raises(StorageError) as ei:
            fn(f"s3://{_bucket(s3_server)}/p", cfg)
        messages.append(str(ei.value))
    with pytest.raises(DataError) as ei:
        inspect_dataset(DataConfig(source=f"s3://{_bucket(s3_server)}/p").with_storage(cfg))
    messages.append(str(ei.value))
    messages += [repr(storage.resolve_credentials(cfg)), repr(cfg), repr(DataConfig().with_storage(cfg)), repr(storage.s3_filesystem_handle(cfg))]
    out = capsys.readouterr()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for text in messages + [out.out, out.err, logs]:
        assert planted_secret not in text
    for text in messages + [out.out, out.err]:
        assert planted_key not in text


def test_fs_handle_survives_pickling(s3_server):
    import pickle

    bucket = _bucket(s3_server)
    s3_server.client().put_object(Bucket=bucket, Key="x", Body=b"data")
    h = pickle.loads(pickle.dumps(storage.s3_filesystem_handle(s3_server.s3_config(), max_attempts=1)))
    assert "max_attempts=1" in repr(h)
    with h.get().open_input_stream(f"{bucket}/x") as f:
        assert f.read() == b"data"


def test_cli_output_has_no_planted_secret(s3_server, s3_faults, monkeypatch, capsys, caplog):
    from orchestrator.cli import data as data_cli

    planted = "PLANTED-ENV-SECRET-77aa99"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTEDENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", planted)
    s3_faults.plan.valid_access_keys = {s3_server.access_key}
    caplog.set_level(logging.DEBUG)
    bucket = _bucket(s3_server)
    args = ["--endpoint-url", s3_faults.endpoint_url, "--region", "us-east-1"]
    assert data_cli.main(["data", "ls", f"s3://{bucket}/x", *args]) == 2
    assert data_cli.main(["data", "verify", f"s3://{bucket}/x", *args]) == 2
    out = capsys.readouterr()
    assert "credentials were rejected" in out.err
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for text in (out.out, out.err, logs):
        assert planted not in text
