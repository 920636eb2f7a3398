"""polling_condition: a check that runs around every command while active (NixOS semantics)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import TestFailure
from .retry import retry

if TYPE_CHECKING:
    from .driver import Driver


class PollingConditionError(TestFailure):
    pass


class PollingCondition:
    def __init__(
        self,
        condition: Callable[[], bool | None],
        driver: Driver,
        seconds_interval: float = 2.0,
        description: str | None = None,
    ) -> None:
        self.condition = condition
        self.driver = driver
        self.seconds_interval = seconds_interval
        self.description = str(description or condition.__doc__ or condition.__name__)
        self.last_called = float("-inf")
        self.entered = False

    def check(self, force: bool = False) -> bool:
        if self.entered or (not force and self.last_called + self.seconds_interval >= time.monotonic()):
            return True
        self.entered = True
        try:
            try:
                result = self.condition()
                ok = result is None or bool(result)
            except Exception:
                ok = False
            self.driver.log(f"Polling condition {'succeeded' if ok else 'failed'}: {self.description}")
            return ok
        finally:
            self.entered = False
            self.last_called = time.monotonic()

    def maybe_raise(self) -> None:
        if not self.check():
            raise PollingConditionError(f"Polling condition failed: {self.description}")

    def wait(self, timeout: int = 900) -> None:
        retry(lambda _last: self.check(force=True), timeout)

    def __enter__(self) -> None:
        self.driver.polling_conditions.append(self)

    def __exit__(self, *exc: object) -> None:
        assert self.driver.polling_conditions.pop() is self


def polling_condition_factory(driver: Driver) -> Callable[..., Any]:
    def polling_condition(
        fun_: Callable[[], bool | None] | None = None,
        *,
        seconds_interval: float = 2.0,
        description: str | None = None,
    ) -> Any:
        if fun_ is not None:
            return PollingCondition(fun_, driver, seconds_interval, description)

        def wrap(fun: Callable[[], bool | None]) -> PollingCondition:
            return PollingCondition(fun, driver, seconds_interval, description)

        return wrap

    return polling_condition
