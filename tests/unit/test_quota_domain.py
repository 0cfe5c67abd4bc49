"""The quota aggregate: given events, when a decision, then events or an error.

The properties: folding any accepted sequence of consume/release keeps usage
within the limits, and any interleaving of clients that read a state, decide on
it and append at the version they read (the log refusing stale versions, the
client reloading and deciding again) never overshoots either.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vim.domain import quota
from vim.domain.base import DomainEvent, parse
from vim.errors import AlreadyExists, InvalidTransition, NotFound

T = "acme"


def given_(*events: DomainEvent) -> quota.Quota | None:
    state: quota.Quota | None = None
    for e in events:
        # Through the stored form, as the read model folds them.
        stored = parse(e.type, e.to_data())
        assert stored == e
        state = quota.evolve(state, stored)
    return state


def limits(**kw: int | None) -> quota.Limits:
    return quota.unlimited() | kw


def test_create_sets_every_limit_absent_ones_unlimited() -> None:
    event = quota.create(None, T, {"cores": 4, "ports": 0}, "t0")
    assert event == quota.QuotaSet(T, limits(cores=4, ports=0), "t0")
    state = given_(event)
    assert state is not None and state.defined
    assert state.view()["limits"] == {
        "cores": "4",
        "ramMb": "-1",
        "instances": "-1",
        "networks": "-1",
        "ports": "0",
    }


def test_create_twice_is_refused_but_allowed_after_delete() -> None:
    state = given_(quota.QuotaSet(T, limits(cores=1)))
    with pytest.raises(AlreadyExists):
        quota.create(state, T, {}, "t1")
    state = given_(quota.QuotaSet(T, limits(cores=1)), quota.QuotaDeleted(T))
    assert quota.create(state, T, {"cores": 2}, "t2").limits["cores"] == 2


def test_update_changes_only_the_named_limits_and_needs_a_quota() -> None:
    state = given_(quota.QuotaSet(T, limits(cores=4, ram_mb=1024)))
    event = quota.update(state, T, {"cores": None, "instances": 3}, "t1")
    assert event.limits == limits(ram_mb=1024, instances=3)
    with pytest.raises(NotFound):
        quota.update(None, T, {"cores": 1}, "t1")
    with pytest.raises(NotFound):
        quota.delete(given_(quota.QuotaConsumed(T, {"cores": 1})), T, "t1")


def test_consume_within_limits_then_exceeded_names_resource_limit_used_asked() -> None:
    state = given_(
        quota.QuotaSet(T, limits(cores=4, ram_mb=4096)), quota.QuotaConsumed(T, {"cores": 3})
    )
    assert quota.consume(state, T, {"cores": 1, "ram_mb": 4096}, "srv-1") == quota.QuotaConsumed(
        T, {"cores": 1, "ram_mb": 4096}, "srv-1"
    )
    with pytest.raises(quota.QuotaExceeded) as err:
        quota.consume(state, T, {"cores": 2}, "srv-2")
    e = err.value
    assert (e.resource, e.limit, e.used, e.asked) == ("cores", 4, 3, 2)
    assert "cores limit 4, used 3, asked 2" in e.message


def test_zero_limit_allows_nothing_and_no_quota_allows_anything() -> None:
    state = given_(quota.QuotaSet(T, limits(networks=0)))
    with pytest.raises(quota.QuotaExceeded):
        quota.consume(state, T, {"networks": 1}, "net-1")
    assert quota.consume(None, T, {"networks": 10**6}, "net-1").amounts == {"networks": 10**6}


def test_usage_survives_delete_and_counts_against_a_new_quota() -> None:
    state = given_(quota.QuotaConsumed(T, {"instances": 2}), quota.QuotaSet(T, limits(instances=2)))
    assert state is not None and state.used["instances"] == 2
    with pytest.raises(quota.QuotaExceeded):
        quota.consume(state, T, {"instances": 1}, "srv-3")
    state = given_(quota.QuotaConsumed(T, {"instances": 2}), quota.QuotaDeleted(T))
    assert state is not None and state.used["instances"] == 2 and not state.defined


def test_over_quota_after_lowering_can_release_not_consume() -> None:
    state = given_(
        quota.QuotaSet(T, limits(cores=8)),
        quota.QuotaConsumed(T, {"cores": 6}),
        quota.QuotaSet(T, limits(cores=2)),
    )
    with pytest.raises(quota.QuotaExceeded):
        quota.consume(state, T, {"cores": 1}, "x")
    assert quota.release(state, T, {"cores": 6}, "x").amounts == {"cores": 6}


def test_release_more_than_used_is_refused() -> None:
    state = given_(quota.QuotaConsumed(T, {"ports": 1}))
    with pytest.raises(InvalidTransition):
        quota.release(state, T, {"ports": 2}, "port-1")


@pytest.mark.parametrize("amounts", [{"gpus": 1}, {"cores": -1}])
def test_unknown_resource_or_negative_amount_is_a_bug(amounts: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        quota.consume(None, T, amounts, "x")


LIMITS = {"cores": 10, "ram_mb": 64, "instances": 3}
amount = st.dictionaries(st.sampled_from(sorted(LIMITS)), st.integers(0, 12), max_size=3)
op = st.tuples(st.sampled_from(["consume", "release"]), amount)


def _within(state: quota.Quota | None) -> None:
    assert state is not None
    for r, limit in LIMITS.items():
        assert 0 <= state.used[r] <= limit, (r, state.used)


@given(st.lists(op, max_size=60))
def test_any_sequence_of_consume_and_release_stays_within_limits(
    ops: list[tuple[str, dict[str, int]]],
) -> None:
    events: list[DomainEvent] = [quota.QuotaSet(T, limits(**LIMITS))]
    state = given_(*events)
    for kind, amounts in ops:
        try:
            decide = quota.consume if kind == "consume" else quota.release
            event: DomainEvent = decide(state, T, amounts, "p")
        except (quota.QuotaExceeded, InvalidTransition):
            continue
        events.append(event)
        state = quota.evolve(state, event)
        _within(state)
    assert given_(*events) == state  # replay gives the incremental state


class Stream:
    """A one-stream log with optimistic concurrency, as the event log appends."""

    def __init__(self, events: Iterable[DomainEvent]) -> None:
        self.events = list(events)

    def read(self) -> tuple[quota.Quota | None, int]:
        return given_(*self.events), len(self.events)

    def append(self, expected: int, event: DomainEvent) -> bool:
        if expected != len(self.events):
            return False
        self.events.append(event)
        return True


@settings(max_examples=200)
@given(
    st.lists(op, min_size=1, max_size=8),
    st.lists(st.integers(0, 7), max_size=80),
)
def test_any_interleaving_of_concurrent_deciders_never_overshoots(
    clients: list[tuple[str, dict[str, int]]], schedule: list[int]
) -> None:
    """Each step lets one client either read+decide or try to append what it decided."""
    log = Stream([quota.QuotaSet(T, limits(**LIMITS))])
    pending: dict[int, tuple[int, DomainEvent] | None] = {}
    done: set[int] = set()
    for step in [*schedule, *list(range(len(clients))) * (2 * len(clients) + 2)]:
        c = step % len(clients)
        if c in done:
            continue
        decided = pending.get(c)
        if decided is None:
            state, version = log.read()
            kind, amounts = clients[c]
            try:
                decide = quota.consume if kind == "consume" else quota.release
                pending[c] = (version, decide(state, T, amounts, f"c{c}"))
            except (quota.QuotaExceeded, InvalidTransition):
                done.add(c)
            continue
        version, event = decided
        if log.append(version, event):
            done.add(c)
        pending[c] = None  # refused: read the newer state and decide again
        _within(log.read()[0])
    assert len(done) == len(clients)
