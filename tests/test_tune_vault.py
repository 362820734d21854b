"""A sweep on S3: Ray Tune writes its Tuner (RunConfig and filesystem included) into the bucket,
and ships the filesystem to trial actors. The keys must reach the trials and never the bucket."""

from __future__ import annotations

import pickle

import pyarrow.fs as pafs
import ray

SECRET = "PLANTED-tune-secret-9f8e7d6c5b4a"


def _noop(config):
    pass


@ray.remote(num_cpus=0)
def _in_a_trial(fs: pafs.S3FileSystem, path: str) -> tuple[str | None, str]:
    """What a trial actor sees: the secret its filesystem holds, and that it can write."""
    with fs.open_output_stream(path) as f:
        f.write(b"pointer")
    secret = pafs.S3FileSystem.__reduce__(fs)[1][0].get("secret_key")
    with fs.open_input_stream(path) as f:
        return secret, f.read().decode()


def test_tune_keeps_s3_keys_out_of_the_bucket_and_hands_them_to_trials(ray_local, s3_server):
    from ray import tune

    from orchestrator.storage import ray_storage
    from orchestrator.tune.vault import VaultedS3FileSystem, vaulted_filesystem

    bucket = s3_server.create_bucket("tune-vault")
    cfg = s3_server.s3_config(access_key_id="AKIAVAULTTEST", secret_access_key=SECRET, addressing_style="path")
    path, plain = ray_storage(f"s3://{bucket}/sweeps/vt", cfg)
    assert SECRET.encode() in pickle.dumps(plain)  # pyarrow's own filesystem: what Tune used to write
    fs, vault = vaulted_filesystem(cfg, "vt")
    tune.Tuner(_noop, run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs))
    client = s3_server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert "sweeps/vt/tune/tuner.pkl" in keys
    for key in keys:
        assert SECRET.encode() not in client.get_object(Bucket=bucket, Key=key)["Body"].read(), key

    # A trial actor unpickles the filesystem while the sweep's vault lives: it has the keys.
    assert ray.get(_in_a_trial.remote(fs, f"{bucket}/sweeps/vt/t1/pointer")) == (SECRET, "pointer")
    # A second driver of the sweep (e.g. after rotating keys) puts its own keys in the vault.
    cfg2 = cfg.model_copy(update={"secret_access_key": cfg.secret_access_key.__class__(SECRET + "-2")})
    fs2, vault2 = vaulted_filesystem(cfg2, "vt")
    assert ray.get(_in_a_trial.remote(fs, f"{bucket}/sweeps/vt/t1/pointer"))[0] == SECRET + "-2"
    # Unpickled with no vault of that name (tuner.pkl read after the driver died): no keys of
    # its own (the process's AWS chain), and Tune replaces it with the restoring driver's.
    gone = VaultedS3FileSystem(fs._public, fs._max_attempts, "s3-credentials-gone", {"access_key": "AKIAX", "secret_key": SECRET})
    orphan = pickle.loads(pickle.dumps(gone))
    assert pafs.S3FileSystem.__reduce__(orphan)[1][0].get("secret_key") is None
    del vault, vault2
