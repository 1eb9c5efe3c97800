"""An Optuna storage on a database server that rides out dropped connections: a server restart, a failover, a
network blip. Every storage call that fails because the connection went away is retried with backoff for up to
RETRY_SECONDS (pool_pre_ping then hands it a fresh connection); other errors pass through at once.

A write whose connection dropped after the server committed it but before the answer came back is done twice on
retry; for Optuna's writes that is harmless (they set a value) except create_new_trial, which can leave one extra
trial in RUNNING state that no Tune trial owns (fer-tune status shows it; Optuna's own retries have the same
window).

Drivers that open a fresh database at the same moment (two studies started together) race to create Optuna's
tables and types; the losers fail with a duplicate-object error and simply open it again once the winner is done.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from optuna.storages import BaseStorage

log = logging.getLogger(__name__)
RETRY_SECONDS = 180.0
CONNECT_SECONDS = 30.0  # a database that is not there when a command starts: most likely a wrong URL
FIRST_WAIT, MAX_WAIT = 0.5, 10.0
SCHEMA_TRIES = 20


def connection_lost(exc: BaseException) -> bool:
    """True for an error (or its cause) that says the database connection is gone or cannot be made."""
    import sqlalchemy.exc as sx

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (sx.OperationalError, sx.InterfaceError)):
            return True
        if isinstance(exc, sx.DBAPIError) and exc.connection_invalidated:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def schema_race(exc: BaseException) -> bool:
    """True for the error of a driver that lost the race to create Optuna's schema on a fresh database."""
    import sqlalchemy.exc as sx

    text = str(exc).lower()
    return isinstance(exc, (sx.IntegrityError, sx.ProgrammingError)) and (
        "already exists" in text or "duplicate" in text
    )


def call_with_retry(what: str, fn: Callable[[], Any], seconds: float = RETRY_SECONDS) -> Any:
    deadline, wait, said = time.monotonic() + seconds, FIRST_WAIT, False
    while True:
        try:
            out = fn()
        except Exception as exc:
            if not connection_lost(exc) or time.monotonic() + wait > deadline:
                raise
            if not said:
                log.warning("fer-tune: the Optuna database went away (%s); retrying for up to %.0f s", what, seconds)
                said = True
            time.sleep(wait)
            wait = min(2 * wait, MAX_WAIT)
            continue
        if said:
            log.warning("fer-tune: the Optuna database is back")
        return out


def _retried(name: str) -> Callable:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return call_with_retry(name, lambda: getattr(self.inner, name)(*args, **kwargs))

    call.__name__ = call.__qualname__ = name
    return call


def _init(self: Any, inner: Any) -> None:
    self.__dict__["inner"] = inner


RetryingStorage = type(
    "RetryingStorage",
    (BaseStorage,),
    {
        "__doc__": "An Optuna storage whose every public call is retried while the database connection is gone.",
        "__init__": _init,
        "__getattr__": lambda self, name: getattr(self.__dict__["inner"], name),  # RDBStorage.engine, ...
        **{n: _retried(n) for n in dir(BaseStorage) if not n.startswith("_") and callable(getattr(BaseStorage, n))},
    },
)


def retrying_storage(make: Callable[[], Any]) -> Any:
    """make() (an RDBStorage), connected with retries, inside a storage whose every public call is retried."""
    for attempt in range(SCHEMA_TRIES):
        try:
            return RetryingStorage(call_with_retry("connect", make, CONNECT_SECONDS))
        except Exception as exc:
            if not schema_race(exc) or attempt == SCHEMA_TRIES - 1:
                raise
            time.sleep(random.uniform(0.1, 0.5))
