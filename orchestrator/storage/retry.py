"""One retry policy per request path, every retry counted.

Each request is retried by exactly one layer: boto3 calls by botocore's "standard" mode (full
jitter exponential backoff on throttling, 5xx and timeouts), bulk pyarrow reads by
``retry_call`` below with pyarrow's own retries turned off. Both count into the process-wide
``retry_counts``, which the training worker adds to every metrics record.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# Error codes S3 (and S3-compatible stores) return for overload or transient server trouble.
TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
     "InternalError", "ServiceUnavailable", "503", "500", "502", "504"}
)
# How pyarrow/OS errors spell the same conditions (pyarrow raises OSError with the AWS text).
_TRANSIENT_MARKERS = ("HTTP status 5", "SLOW_DOWN", "SlowDown", "THROTTL", "Throttl", "NETWORK_CONNECTION",
                      "timed out", "Timeout", "TIMEOUT", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
                      "Connection reset")


class RetryCounter:
    """Counts retried S3 requests (thread-safe) by error code."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] = self._counts.get(kind, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


retry_counts = RetryCounter()


def botocore_retry_hook(max_attempts: int) -> Callable[..., None]:
    """A ``needs-retry`` handler that counts the attempts botocore will actually retry."""

    def hook(attempts: int = 1, response: Any = None, caught_exception: Any = None, **_: Any) -> None:
        if attempts >= max_attempts:
            return  # the last attempt: botocore gives up, nothing is retried
        if caught_exception is not None:
            retry_counts.add(type(caught_exception).__name__)
        elif response is not None:
            http, parsed = response
            code = (parsed or {}).get("Error", {}).get("Code") or str(getattr(http, "status_code", ""))
            if getattr(http, "status_code", 200) >= 500 or code in TRANSIENT_CODES:
                retry_counts.add(code)

    return hook


def is_transient(e: BaseException) -> bool:
    """Whether a pyarrow/OS error looks like throttling, a 5xx or a network hiccup."""
    if isinstance(e, FileNotFoundError):
        return False
    return isinstance(e, (TimeoutError, ConnectionError)) or any(m in str(e) for m in _TRANSIENT_MARKERS)


def retry_call(fn: Callable[[], T], *, max_attempts: int, on_retry: Callable[[BaseException], None] | None = None,
               base_delay_s: float = 0.1, max_delay_s: float = 5.0) -> T:
    """Call ``fn()``; on a transient error retry with full-jitter exponential backoff (the AWS
    SDK's standard policy). Each retry is counted in ``retry_counts`` and reported to
    ``on_retry(exception)``."""
    for attempt in range(1, max_attempts + 1):
        try:
            return fn()
        except OSError as e:
            if attempt >= max_attempts or not is_transient(e):
                raise
            retry_counts.add(type(e).__name__)
            if on_retry is not None:
                on_retry(e)
            time.sleep(random.uniform(0, min(max_delay_s, base_delay_s * 2**attempt)))
    raise AssertionError("unreachable: the loop returns or raises")
