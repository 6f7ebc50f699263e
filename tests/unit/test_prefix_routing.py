"""The routing policy (engine.prefix_routing) on made-up replica loads: affinity, the
load guard, sessions, and forgetting what a replica no longer holds."""

from __future__ import annotations

import random

import pytest

from engine.prefix_routing import BlockLRU, PolicyConfig, PrefixAffinity, ReplicaState

FILE = [101, 102, 103, 104, 105, 106]  # block hashes of one file's prompt
OTHER = [201, 202, 203]


def policy(**config) -> PrefixAffinity:
    p = PrefixAffinity(PolicyConfig(**config))
    p.sync({"a": (1000, 1.0), "b": (1000, 1.0)})
    return p


def load(a=0, b=0, sat=()):
    return [ReplicaState("a", a, "a" in sat), ReplicaState("b", b, "b" in sat)]


def route(p, replicas, blocks=(), session=None):
    d = p.choose(replicas, list(blocks), session)
    p.record(d, list(blocks), session)
    return d


def test_prefix_affinity_follows_the_blocks():
    p = policy()
    first = route(p, load(), FILE)
    assert first.reason == "balance" and first.matched_blocks == 0
    # The same file again, even with the other replica idle: where its blocks are.
    busy, idle = (1, 0) if first.replica_id == "a" else (0, 1)
    again = route(p, load(busy, idle), FILE[:4] + [999])
    assert (again.replica_id, again.reason, again.matched_blocks) == (first.replica_id, "prefix", 4)


def test_longest_match_wins_and_equals_go_to_the_less_loaded():
    p = policy()
    p.record(p.choose(load(0, 9), FILE[:2], None), FILE[:2], None)  # a holds 2 blocks
    p.record(p.choose(load(9, 0), FILE, None), FILE, None)  # b holds all 6
    assert route(p, load(0, 3), FILE).replica_id == "b"
    p.record(p.choose(load(0, 9), FILE, None), FILE, None)  # now both hold all 6
    assert route(p, load(3, 1), FILE).replica_id == "b"
    assert route(p, load(1, 3), FILE).replica_id == "a"


def test_a_saturated_replica_gets_no_affinity_traffic():
    p = policy()
    home = route(p, load(), FILE).replica_id
    other = "b" if home == "a" else "a"
    d = route(p, load(sat=(home,)), FILE)
    assert (d.replica_id, d.reason, d.guard, d.overridden) == (other, "balance", "prefix", home)
    assert p.overrides["prefix"] == 1
    # Once it is no longer saturated, affinity returns (both now hold the file).
    assert route(p, load(**{home: 0, other: 1}), FILE).replica_id == home


def test_the_imbalance_bound_caps_affinity():
    p = policy(max_imbalance=4, max_imbalance_ratio=1.25)
    p.record(p.choose(load(0, 9), FILE, None), FILE, None)  # a holds the file
    assert route(p, load(4, 0), FILE).replica_id == "a"  # 4 above the least: allowed
    d = route(policy(max_imbalance=4), load(5, 0), FILE)  # fresh policy: nothing held
    assert d.reason == "balance" and d.replica_id == "b"
    p2 = policy(max_imbalance=4, max_imbalance_ratio=1.25)
    p2.record(p2.choose(load(0, 99), FILE, None), FILE, None)
    over = route(p2, load(5, 0), FILE)
    assert (over.replica_id, over.guard) == ("b", "prefix")
    # At high load the ratio allows more: 40 + 25% = 50.
    p3 = policy(max_imbalance=4, max_imbalance_ratio=1.25)
    p3.record(p3.choose(load(0, 99), FILE, None), FILE, None)
    assert route(p3, load(50, 40), FILE).replica_id == "a"
    assert route(p3, load(51, 40), FILE).guard == "prefix"


def test_when_all_are_saturated_the_least_loaded_serves():
    p = policy()
    assert route(p, load(7, 3, sat=("a", "b"))).replica_id == "b"


def test_sessions_stay_put_until_the_guard_moves_them():
    p = policy()
    home = route(p, load(), session="s1").replica_id
    other = "b" if home == "a" else "a"
    for _ in range(5):
        d = route(p, load(**{home: 3, other: 0}), OTHER, session="s1")
        assert (d.replica_id, d.reason) == (home, "session")
    moved = route(p, load(sat=(home,)), session="s1")
    assert (moved.replica_id, moved.guard, moved.overridden) == (other, "session", home)
    # The session now lives where it was moved to.
    assert route(p, load(), session="s1").replica_id == other
    assert p.session_replica("s1") == other


def test_session_affinity_can_be_turned_off():
    p = policy(session_affinity=False)
    route(p, load(0, 1), session="s1")
    assert route(p, load(1, 0), session="s1").replica_id == "b"
    assert p.session_replica("s1") is None


def test_eviction_forgets_the_oldest_blocks():
    p = PrefixAffinity(PolicyConfig())
    p.sync({"a": (4, 1.0), "b": (4, 1.0)})
    home = route(p, load(), FILE[:4]).replica_id
    route(p, load(**{home: 0, ("b" if home == "a" else "a"): 9}), OTHER)  # 3 more blocks there
    assert p.held_blocks(home) == 4
    # FILE's first blocks were least recently used: gone, so no affinity for it.
    assert route(p, load(5, 5), FILE[:4]).matched_blocks == 0


def test_capacity_follows_the_replica_report():
    p = PrefixAffinity(PolicyConfig())
    p.sync({"a": (100, 1.0)})
    route(p, [ReplicaState("a", 0)], list(range(50)))
    p.sync({"a": (10, 1.0)})
    assert p.held_blocks("a") == 10


def test_a_restarted_or_removed_replica_is_forgotten():
    p = policy()
    home = route(p, load(), FILE, session="s").replica_id
    p.sync({"a": (1000, 1.0 if home == "b" else 2.0), "b": (1000, 1.0 if home == "a" else 2.0)})
    assert p.held_blocks(home) == 0 and p.session_replica("s") is None
    home = route(p, load(), FILE, session="s").replica_id
    p.sync({r: (1000, 2.0) for r in ("a", "b") if r != home} | {"c": (1000, 1.0)})
    assert p.held_blocks(home) == 0 and p.session_replica("s") is None


def test_balance_ties_are_the_same_for_every_router():
    """Two routers that never met send a cold prompt to the same replica."""
    for seed in range(20):
        blocks = [seed * 1000 + 1, seed * 1000 + 2]
        assert policy().choose(load(), blocks, None) == policy().choose(load(), blocks, None)


def test_block_lru_matches_leading_blocks_only():
    lru = BlockLRU(10)
    lru.touch([1, 2, 3])
    assert lru.matched([1, 2, 3, 4]) == 3
    assert lru.matched([2, 3]) == 2
    assert lru.matched([9, 1, 2]) == 0


@pytest.mark.parametrize("workload", ["one_shared_prefix", "sessions_over_repos"])
def test_no_hot_spot_under_closed_loop_load(workload):
    """16 clients in a closed loop on two replicas, each request lasting a few ticks:
    affinity keeps most requests on warm blocks, and neither replica takes much more
    than its share (the failure modes of production-stack #957 and SGLang #14305)."""
    rng = random.Random(7)
    p = policy()
    in_flight: list[tuple[int, str]] = []  # (finishes at tick, replica)
    served = {"a": 0, "b": 0}
    warm = 0
    total = 0
    for tick in range(2000):
        in_flight = [(end, r) for end, r in in_flight if end > tick]
        while len(in_flight) < 16:
            client = rng.randrange(16)
            if workload == "one_shared_prefix":
                blocks = [1, 2, 3, 4, 5, 6] + [10_000 + rng.randrange(10**6)]
                session = None
            else:  # 4 repos, 4 sessions each; a session's file grows a little each time
                repo = client % 4
                blocks = [repo * 100 + i for i in range(1, 5)] + [50_000 + client]
                session = f"s{client}"
            ongoing = {r: sum(1 for _, x in in_flight if x == r) for r in served}
            d = route(p, [ReplicaState(r, n) for r, n in ongoing.items()], blocks, session)
            served[d.replica_id] += 1
            total += 1
            warm += d.matched_blocks > 0
            in_flight.append((tick + rng.randint(2, 6), d.replica_id))
    assert max(served.values()) / total <= 0.6
    assert warm / total >= 0.9
