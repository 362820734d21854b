"""S3 credentials: from the config (``SecretStr``), a named profile, or the AWS chain.

Credentials live in memory only. Every secret resolved here is registered with a logging filter
on the libraries we call, because botocore logs the canonical request (with the session token)
at DEBUG level: a user who turns on DEBUG logging must still not see credentials.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.storage.uri import StorageError

if TYPE_CHECKING:
    from orchestrator.config import S3Config

# Loggers of the libraries that may print request details.
_SCRUBBED_LOGGERS = (
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
)
# Credential sources that are static, so a frozen copy can travel to Ray workers.
_STATIC_CREDENTIAL_METHODS = frozenset({"env", "shared-credentials-file", "config-file", "explicit"})


@dataclass(frozen=True)
class Creds:
    access_key: str | None
    secret_key: str | None
    token: str | None

    def __repr__(self) -> str:  # never show secrets, even in a debugger or traceback
        return f"Creds(access_key={'set' if self.access_key else None}, secret_key=***)"


class SecretScrubber(logging.Filter):
    """Replaces registered secrets in log records."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()
        self.installed = False

    def install(self) -> None:
        # On first use rather than at import: importing raydiff must not touch global logging.
        if not self.installed:
            for name in _SCRUBBED_LOGGERS:
                logging.getLogger(name).addFilter(self)
            self.installed = True

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
        if scrubbed != text:
            record.msg, record.args = scrubbed, None
        return True


scrubber = SecretScrubber()


def register_secrets(*values: str | None) -> None:
    scrubber.install()
    for v in values:
        # Short values (e.g. "testing") would shred ordinary log text and protect nothing real.
        if v and len(v) >= 8:
            scrubber.secrets.add(v)


def default_s3cfg() -> "S3Config":
    from orchestrator.config import S3Config

    return S3Config()


def resolve_credentials(s3cfg: "S3Config | None") -> Creds:
    """Explicit keys from the config, else the named profile, else the AWS chain's static keys
    (or all None: each process then uses its own chain)."""
    s3cfg = s3cfg or default_s3cfg()
    if s3cfg.access_key_id is not None or s3cfg.secret_access_key is not None:
        if s3cfg.access_key_id is None or s3cfg.secret_access_key is None:
            raise StorageError(
                "s3 credentials are half set: give both storage.s3.access_key_id and storage.s3.secret_access_key, "
                "or neither (then the AWS chain is used: env vars, profile, instance role)"
            )
        creds = Creds(
            s3cfg.access_key_id.get_secret_value(),
            s3cfg.secret_access_key.get_secret_value(),
            s3cfg.session_token.get_secret_value() if s3cfg.session_token else None,
        )
        register_secrets(creds.secret_key, creds.token)
        return creds
    if s3cfg.profile:
        import boto3
        import botocore.exceptions

        try:
            c = boto3.Session(profile_name=s3cfg.profile).get_credentials()
        except botocore.exceptions.ProfileNotFound:
            raise StorageError(
                f"AWS profile {s3cfg.profile!r} (storage.s3.profile) is not in ~/.aws/config or ~/.aws/credentials: "
                "create it with `aws configure --profile NAME` or unset storage.s3.profile"
            ) from None
        if c is None:
            raise StorageError(f"AWS profile {s3cfg.profile!r} (storage.s3.profile) has no credentials")
        f = c.get_frozen_credentials()
        register_secrets(f.secret_key, f.token)
        return Creds(f.access_key, f.secret_key, f.token)
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
        register_secrets(f.secret_key, f.token)
        return Creds(f.access_key, f.secret_key, f.token)
    return Creds(None, None, None)


def scrub(text: str, s3cfg: "S3Config | None") -> str:
    """Remove any configured or registered secret from a message we did not write ourselves."""
    secrets = set(scrubber.secrets)
    if s3cfg is not None:
        for s in (s3cfg.access_key_id, s3cfg.secret_access_key, s3cfg.session_token):
            if s is not None and s.get_secret_value():
                secrets.add(s.get_secret_value())
    for env in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        v = os.environ.get(env)
        if v and len(v) >= 8:
            secrets.add(v)
    for s in secrets:
        text = text.replace(s, "***")
    return text
