"""How long a device waits after a failed update, and when it stops trying one artifact.

A device whose update failed waits before it tries again: ``first`` seconds after the first
failure, ``factor`` times longer after each further one, never longer than ``cap``, each wait
spread by ``+- jitter`` so that a fleet that failed together does not retry together. After
``give_up_after`` failures of the same *artifact* (the exact thing offered: a deployment id and
SHA-256 from the check-in API, a file and version from a job document) the device neither
downloads nor reports it again; a different artifact (a new deployment, another version) is
tried afresh. So the server sees one failure per attempt, never one per poll.

Pure: no clock and no random source inside. The caller passes ``random`` (a number in
``[0, 1)``) and waits the seconds returned itself, so the agent (threads), the fleet simulator
(asyncio) and tests drive it alike. The state persists through :meth:`Backoff.to_dict` and
:meth:`Backoff.from_dict` (a JSON file next to the device's journal); it holds at most
``MAX_ARTIFACTS`` artifacts, the most recent, each key at most ``MAX_KEY_CHARS`` characters.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

from otakit.errors import UsageError

MAX_ARTIFACTS = 16
"""Artifacts remembered; the least recently failed one is forgotten first."""
MAX_KEY_CHARS = 200
"""Longer artifact keys are remembered by their SHA-256 (same key, same digest)."""
STATE_FORMAT = 1
"""``"format"`` of :meth:`Backoff.to_dict`; another format reads as a clean state."""


class RetryPolicyError(UsageError):
    """A retry policy value is out of range."""

    code = "RETRY_POLICY"


@dataclass(frozen=True)
class RetryPolicy:
    """The backoff after failed updates (seconds) and the give-up count.

    ``give_up_after = 0`` never gives up. ``factor = 1`` and ``jitter = 0`` give the constant
    interval of the original middleware (``CY_OTA_RETRY_INTERVAL_SECS``).

    Raises:
        RetryPolicyError: ``first`` not a finite number greater than 0, ``factor`` below 1,
            ``cap`` below ``first``, ``jitter`` outside ``[0, 1)``, ``give_up_after`` not an
            integer from 0 up.
    """

    first: float = 5.0  # seconds after the first failure
    factor: float = 2.0
    cap: float = 3600.0
    jitter: float = 0.2  # +- fraction
    give_up_after: int = 5  # failures of the same artifact

    def __post_init__(self) -> None:
        if not _finite(self.first) or self.first <= 0:
            raise RetryPolicyError(
                f"the first retry delay must be greater than 0 s, not {self.first!r}",
                value=self.first,
            )
        if not _finite(self.factor) or self.factor < 1:
            raise RetryPolicyError(
                f"the backoff factor must be at least 1, not {self.factor!r}", value=self.factor
            )
        if not _finite(self.cap) or self.cap < self.first:
            raise RetryPolicyError(
                f"the backoff cap must be at least the first delay ({self.first} s), "
                f"not {self.cap!r}",
                value=self.cap,
            )
        if not _finite(self.jitter) or not 0 <= self.jitter < 1:
            raise RetryPolicyError(
                f"the jitter must be from 0 to below 1, not {self.jitter!r}", value=self.jitter
            )
        if type(self.give_up_after) is not int or self.give_up_after < 0:
            raise RetryPolicyError(
                f"give_up_after must be an integer from 0 up, not {self.give_up_after!r}",
                value=self.give_up_after,
            )

    def delay(self, failures: int, *, random: float) -> float:
        """Seconds to wait after ``failures`` (>= 1) failures in a row.

        ``first * factor ** (failures - 1)``, at most ``cap``, spread by ``+- jitter`` of
        itself with ``random`` in ``[0, 1)`` (0.5 is the middle) and never above ``cap``.

        Raises:
            RetryPolicyError: ``failures`` below 1 or ``random`` outside ``[0, 1)``.
        """
        if type(failures) is not int or failures < 1:
            raise RetryPolicyError(
                f"a delay needs at least one failure, not {failures!r}", value=failures
            )
        if not _finite(random) or not 0 <= random < 1:
            raise RetryPolicyError(f"random must be in [0, 1), not {random!r}", value=random)
        # factor ** n overflows a float long before the cap stops mattering: compare logs
        steps = failures - 1
        if self.factor == 1 or steps * math.log(self.factor) < math.log(self.cap / self.first):
            base = min(self.cap, self.first * self.factor**steps)
        else:
            base = self.cap
        spread = base * self.jitter
        low, high = base - spread, min(self.cap, base + spread)
        return low + (high - low) * random


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _key(artifact: str) -> str:
    if len(artifact) <= MAX_KEY_CHARS:
        return artifact
    return "sha256:" + hashlib.sha256(artifact.encode("utf-8", "replace")).hexdigest()


class Backoff:
    """Failures counted per artifact under a :class:`RetryPolicy`.

    ``failed`` counts a failed attempt and says how long to wait; ``gave_up`` says that an
    artifact failed ``give_up_after`` times and must be neither downloaded nor reported again;
    ``succeeded`` forgets an artifact. Only the ``MAX_ARTIFACTS`` most recently failed artifacts
    are remembered. Small (slots, one dict, empty until a failure), as a fleet simulator holds
    one per device.
    """

    __slots__ = ("_failures", "policy")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._failures: dict[str, int] = {}  # insertion order: least recently failed first

    def failures(self, artifact: str) -> int:
        """Failed attempts of ``artifact`` remembered (0 for one never seen or forgotten)."""
        return self._failures.get(_key(artifact), 0)

    def failed(self, artifact: str, *, random: float) -> float:
        """Count a failed attempt of ``artifact``; the seconds to wait before the next attempt.

        ``random`` in ``[0, 1)`` places the wait inside the jitter band.

        Raises:
            RetryPolicyError: ``random`` outside ``[0, 1)`` (nothing is counted then).
        """
        key = _key(artifact)
        count = self._failures.get(key, 0) + 1
        wait = self.policy.delay(count, random=random)
        self._failures.pop(key, None)
        self._failures[key] = count  # now the most recent
        while len(self._failures) > MAX_ARTIFACTS:
            del self._failures[next(iter(self._failures))]
        return wait

    def succeeded(self, artifact: str) -> None:
        """Forget ``artifact``'s failures: it installed."""
        self._failures.pop(_key(artifact), None)

    def gave_up(self, artifact: str) -> bool:
        """True when ``artifact`` failed ``give_up_after`` times: do not download or report it
        again. Always False with ``give_up_after = 0``."""
        limit = self.policy.give_up_after
        return limit > 0 and self.failures(artifact) >= limit

    def to_dict(self) -> dict[str, Any]:
        """The state as JSON-ready data, oldest artifact first."""
        return {
            "format": STATE_FORMAT,
            "failures": [[key, count] for key, count in self._failures.items()],
        }

    @classmethod
    def from_dict(cls, policy: RetryPolicy, data: object) -> Backoff:
        """A Backoff with the state ``to_dict`` gave; anything else (None for a missing file,
        a corrupt or foreign document, another format) gives a clean state. Never raises for
        bad data: a device must not stop updating because its retry state was damaged."""
        backoff = cls(policy)
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            return backoff
        items = data.get("failures")
        if not isinstance(items, list):
            return backoff
        restored: dict[str, int] = {}
        for item in items:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or type(item[1]) is not int
                or item[1] < 1
            ):
                return backoff
            key = _key(item[0])
            restored.pop(key, None)
            restored[key] = item[1]
        while len(restored) > MAX_ARTIFACTS:
            del restored[next(iter(restored))]
        backoff._failures = restored
        return backoff

    def __repr__(self) -> str:
        return f"Backoff({self.policy!r}, failures={dict(self._failures)!r})"
