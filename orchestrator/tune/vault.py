"""The sweep's S3 filesystem for Ray Tune, without its credentials in what Tune writes.

Ray Tune pickles the Tuner, its ``RunConfig`` included, into ``{sweep}/tune/tuner.pkl`` in the
sweep's own storage, and pyarrow's ``S3FileSystem`` pickles with its keys: every S3 sweep with
static credentials (config, environment, credentials file, profile: ``resolve_credentials``)
left its secret key in the bucket (seen: the planted secret in tuner.pkl). Tune also ships the
filesystem to every trial actor, on any node, and those need the keys.

So the sweep's filesystem is a ``VaultedS3FileSystem``: its pickle holds the endpoint, region,
timeouts and retries, and the name of a Ray actor that holds the credentials in memory for the
sweep's lifetime (``CredentialVault``, owned by the sweep driver, gone with it). A process that
unpickles it while the sweep runs (a trial actor) asks the vault for the keys; a tuner.pkl read
after the driver died yields a filesystem with the reader's own AWS chain, which
``Tuner.restore(storage_filesystem=...)`` replaces with the restoring driver's anyway.
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs
import ray

from orchestrator.storage.clients import default_s3cfg, s3_filesystem_kwargs
from orchestrator.tune.cleanup import NAMESPACE


@ray.remote(num_cpus=0)
class CredentialVault:
    def __init__(self) -> None:
        self._secret: dict[str, str] = {}

    def put(self, secret: dict[str, str]) -> None:
        self._secret = secret

    def get(self) -> dict[str, str]:
        return self._secret


def vault_name(sweep: str) -> str:
    return f"s3-credentials-{sweep}"


class VaultedS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem whose pickle names the vault instead of carrying the keys (and
    keeps the retry strategy, which pyarrow's own pickle drops)."""

    def __init__(self, public: dict[str, Any], max_attempts: int, vault: str, secret: dict[str, str]):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **public, **secret)
        self._public, self._max_attempts, self._vault = public, max_attempts, vault

    def __reduce__(self) -> tuple[Any, ...]:
        return _from_vault, (self._public, self._max_attempts, self._vault)


def _from_vault(public: dict[str, Any], max_attempts: int, vault: str) -> VaultedS3FileSystem:
    secret: dict[str, str] = {}
    if ray.is_initialized():
        try:
            secret = ray.get(ray.get_actor(vault, namespace=NAMESPACE).get.remote())
        except (ValueError, ray.exceptions.RayActorError):
            pass  # no live sweep driver holds the vault: this process's own AWS chain
    return VaultedS3FileSystem(public, max_attempts, vault, secret)


def vaulted_filesystem(s3cfg: Any, sweep: str) -> tuple[VaultedS3FileSystem, Any]:
    """``(filesystem, vault actor)`` for a sweep on S3; Ray must be initialised. Keep the actor
    handle for as long as the sweep runs: the vault goes with its last handle."""
    s3cfg = s3cfg or default_s3cfg()
    public, secret = s3_filesystem_kwargs(s3cfg)
    name = vault_name(sweep)
    vault = CredentialVault.options(name=name, namespace=NAMESPACE, get_if_exists=True).remote()
    ray.get(vault.put.remote(secret))  # a vault left by an earlier driver may hold older keys
    return VaultedS3FileSystem(public, s3cfg.max_attempts, name, secret), vault
