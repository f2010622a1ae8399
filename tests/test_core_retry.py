"""The retry policy (device/core/retry.py): exponential waits with jitter and a cap, giving up
on one artifact after N failures, a new artifact tried afresh, and a state that survives a
restart (and a damaged state file) — all without a clock or a server."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otakit.device.core.retry import (
    MAX_ARTIFACTS,
    MAX_KEY_CHARS,
    Backoff,
    RetryPolicy,
    RetryPolicyError,
)

MIDDLE = 0.5  # random = 0.5 is the un-jittered delay

A = "deployment:7 sha256:" + "AB" * 32
B = "deployment:8 sha256:" + "CD" * 32


def test_waits_grow_exponentially_from_the_first_delay() -> None:
    policy = RetryPolicy(first=5, factor=2, cap=10_000, jitter=0.2)
    assert [policy.delay(n, random=MIDDLE) for n in range(1, 6)] == [5, 10, 20, 40, 80]


def test_the_cap_bounds_every_wait_even_after_very_many_failures() -> None:
    policy = RetryPolicy(first=5, factor=3, cap=60, jitter=0.0)
    assert [policy.delay(n, random=MIDDLE) for n in (1, 2, 3, 4)] == [5, 15, 45, 60]
    # 3 ** 10_000 overflows a float: the cap still answers
    assert policy.delay(10_000, random=0.999) == 60


def test_jitter_spreads_the_wait_by_its_fraction() -> None:
    policy = RetryPolicy(first=100, factor=2, cap=10_000, jitter=0.2)
    assert policy.delay(1, random=0.0) == pytest.approx(80)
    assert policy.delay(1, random=0.25) == pytest.approx(90)
    assert policy.delay(1, random=0.999999) == pytest.approx(120, abs=1e-3)


def test_jitter_at_the_cap_only_shortens_the_wait() -> None:
    policy = RetryPolicy(first=10, factor=2, cap=100, jitter=0.5)
    assert policy.delay(20, random=0.0) == pytest.approx(50)
    assert policy.delay(20, random=0.999999) == pytest.approx(100, abs=1e-3)
    assert policy.delay(20, random=0.5) == pytest.approx(75)


@given(
    first=st.floats(0.001, 1e6),
    factor=st.floats(1, 100),
    extra=st.floats(0, 1e7),
    jitter=st.floats(0, 0.99),
    failures=st.integers(1, 5000),
    random=st.floats(0, 1, exclude_max=True),
)
def test_every_wait_is_inside_the_jitter_band_and_below_the_cap(
    first: float, factor: float, extra: float, jitter: float, failures: int, random: float
) -> None:
    policy = RetryPolicy(first=first, factor=factor, cap=first + extra, jitter=jitter)
    wait = policy.delay(failures, random=random)
    growth = math.exp(min(700.0, (failures - 1) * math.log(factor)))
    base = min(policy.cap, first * growth)
    assert math.isfinite(wait)
    assert base * (1 - jitter) * (1 - 1e-9) <= wait <= policy.cap * (1 + 1e-9)
    assert wait <= base * (1 + jitter) * (1 + 1e-9)


def test_factor_one_without_jitter_is_the_originals_constant_interval() -> None:
    policy = RetryPolicy(first=5, factor=1, cap=5, jitter=0)
    assert {policy.delay(n, random=0.7) for n in range(1, 50)} == {5}


def test_gives_up_on_the_same_artifact_after_n_failures() -> None:
    backoff = Backoff(RetryPolicy(first=5, factor=2, cap=3600, jitter=0, give_up_after=3))
    waits = []
    for _ in range(3):
        assert not backoff.gave_up(A)
        waits.append(backoff.failed(A, random=MIDDLE))
    assert waits == [5, 10, 20]
    assert backoff.gave_up(A)
    assert backoff.failures(A) == 3


def test_a_new_artifact_is_tried_afresh() -> None:
    backoff = Backoff(RetryPolicy(first=5, factor=2, cap=3600, jitter=0, give_up_after=2))
    backoff.failed(A, random=MIDDLE)
    backoff.failed(A, random=MIDDLE)
    assert backoff.gave_up(A)
    assert not backoff.gave_up(B)
    assert backoff.failed(B, random=MIDDLE) == 5  # the first delay again, not A's count
    assert backoff.gave_up(A)  # A stays given up: it is the exact thing that failed


def test_success_forgets_the_artifacts_failures() -> None:
    backoff = Backoff(RetryPolicy(jitter=0, give_up_after=2))
    backoff.failed(A, random=MIDDLE)
    backoff.succeeded(A)
    assert backoff.failures(A) == 0
    assert backoff.failed(A, random=MIDDLE) == 5


def test_give_up_after_zero_never_gives_up() -> None:
    backoff = Backoff(RetryPolicy(give_up_after=0))
    for _ in range(50):
        backoff.failed(A, random=0.1)
    assert backoff.failures(A) == 50
    assert not backoff.gave_up(A)


def test_only_the_most_recent_artifacts_are_remembered() -> None:
    backoff = Backoff(RetryPolicy(give_up_after=1))
    for n in range(MAX_ARTIFACTS + 4):
        backoff.failed(f"artifact-{n}", random=0.1)
    kept = backoff.to_dict()["failures"]
    assert len(kept) == MAX_ARTIFACTS
    assert not backoff.gave_up("artifact-0")  # forgotten: the oldest go first
    assert backoff.gave_up(f"artifact-{MAX_ARTIFACTS + 3}")


def test_a_long_key_is_remembered_by_its_digest() -> None:
    backoff = Backoff(RetryPolicy(give_up_after=1))
    long_key = "x" * (MAX_KEY_CHARS * 10)
    backoff.failed(long_key, random=0.1)
    assert backoff.gave_up(long_key)
    assert not backoff.gave_up("x" * (MAX_KEY_CHARS * 10 - 1))
    [[stored, count]] = backoff.to_dict()["failures"]
    assert len(stored) <= MAX_KEY_CHARS
    assert count == 1


def test_the_state_survives_a_json_round_trip() -> None:
    policy = RetryPolicy(first=5, factor=2, cap=3600, jitter=0, give_up_after=3)
    before = Backoff(policy)
    for _ in range(3):
        before.failed(A, random=MIDDLE)
    before.failed(B, random=MIDDLE)
    after = Backoff.from_dict(policy, json.loads(json.dumps(before.to_dict())))
    assert after.gave_up(A)
    assert after.failures(B) == 1
    assert after.failed(B, random=MIDDLE) == 10  # continues from the count, not from scratch
    assert after.to_dict()["failures"] == [[A, 3], [B, 2]]


@pytest.mark.parametrize(
    "data",
    [
        None,  # no state file
        "garbage",
        [],
        {},
        {"format": 99, "failures": [[A, 3]]},
        {"format": 1, "failures": "x"},
        {"format": 1, "failures": [[A, 3], [B]]},
        {"format": 1, "failures": [[A, "3"]]},
        {"format": 1, "failures": [[A, 0]]},
        {"format": 1, "failures": [[A, True]]},
        {"format": 1, "failures": [[7, 3]]},
    ],
)
def test_a_missing_or_corrupt_state_starts_clean(data: object) -> None:
    backoff = Backoff.from_dict(RetryPolicy(give_up_after=1), data)
    assert backoff.to_dict()["failures"] == []
    assert not backoff.gave_up(A)


def test_a_state_longer_than_the_bound_keeps_the_newest() -> None:
    data = {"format": 1, "failures": [[f"a{n}", 1] for n in range(MAX_ARTIFACTS + 5)]}
    backoff = Backoff.from_dict(RetryPolicy(give_up_after=1), data)
    kept = [key for key, _ in backoff.to_dict()["failures"]]
    assert kept == [f"a{n}" for n in range(5, MAX_ARTIFACTS + 5)]


@pytest.mark.parametrize(
    ("fields", "value"),
    [
        ({"first": 0}, 0),
        ({"first": math.inf}, math.inf),
        ({"factor": 0.5}, 0.5),
        ({"cap": 1, "first": 5}, 1),
        ({"jitter": 1.0}, 1.0),
        ({"jitter": -0.1}, -0.1),
        ({"give_up_after": -1}, -1),
        ({"give_up_after": 2.0}, 2.0),
    ],
)
def test_a_policy_out_of_range_is_a_named_error(fields: dict[str, float], value: float) -> None:
    with pytest.raises(RetryPolicyError) as caught:
        RetryPolicy(**fields)  # type: ignore[arg-type]
    assert caught.value.code == "RETRY_POLICY"
    assert caught.value.value == value
    assert "\n" not in caught.value.message


@pytest.mark.parametrize("random", [-0.1, 1.0, math.nan])
def test_random_outside_its_range_is_refused_and_counts_nothing(random: float) -> None:
    backoff = Backoff(RetryPolicy())
    with pytest.raises(RetryPolicyError):
        backoff.failed(A, random=random)
    assert backoff.failures(A) == 0
