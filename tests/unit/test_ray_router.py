"""CodeLlamaRouter through Ray's request-router interface, with fake replicas (named
fakes: they answer Ray's queue-length probe and carry routing stats, nothing else).

What Ray hands the router is what Ray's ingress request router (`LLMRouter`) passes:
the parsed body as `pending_request.args[0]`, the X-Session-Id header as the request
metadata's `session_id`; through Ray's proxy the args hold no body.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import uuid
from types import SimpleNamespace

import pytest
from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve.request_router import PendingRequest

from engine import prefix_routing, ray_router
from engine.ray_router import CodeLlamaRouter

DEPLOYMENT = DeploymentID(name="CodeLlamaServer", app_name="codellama")
SOURCE = inspect.getsource(prefix_routing)


class FakeReplica:
    """Stands in for Ray's RunningReplica: an id, routing stats, a queue length."""

    def __init__(self, name: str, queue_len: int = 0, **stats: float) -> None:
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEPLOYMENT)
        self.queue_len = queue_len
        self.max_ongoing_requests = 512
        self.routing_stats: dict[str, float] = {
            "block_size": 128, "kv_cache_blocks": 1000, "engine_started_at": 1.0,
            "engine_waiting": 0, "kv_cache_usage": 0.1, **stats,
        }  # fmt: skip
        self.probes = 0

        self.hold_until = 0  # probes stay unanswered until this many have been sent
        self._answer = asyncio.Event()

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.probes += 1
        if self.probes >= self.hold_until:
            self._answer.set()
        await self._answer.wait()
        return self.queue_len


@pytest.fixture
async def router(demo_model_dir, monkeypatch):
    # Sequential requests here each finish before the next: probe every time (the
    # burst test below probes once).
    monkeypatch.setattr(ray_router, "LOAD_PROBE_INTERVAL_S", 0.0)
    r = CodeLlamaRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    r.initialize_state(model="demo", tokenizer=str(demo_model_dir))
    r.prompts_loading.result(timeout=60)
    # The fakes never count a request, and each one here has finished before the next
    # is routed: no allowance for requests still on their way.
    r.load.arrival_s = 0.0
    return r


def request(body: dict | None = None, session: str = "") -> PendingRequest:
    args = [SimpleNamespace(**body)] if body is not None else [b"asgi-scope"]
    meta = RequestMetadata(request_id=uuid.uuid4().hex, internal_request_id=uuid.uuid4().hex,
                           session_id=session)  # fmt: skip
    return PendingRequest(args=args, kwargs={}, metadata=meta)


async def pick(router, replicas, pending) -> str:
    ranks = await router.choose_replicas(replicas, pending)
    # The choice first, alone; every other candidate after it (Ray's proxy falls back
    # along the ranks when a replica refuses).
    assert len(ranks[0]) == 1
    assert sorted(id(r) for rank in ranks for r in rank) == sorted(map(id, replicas))
    return ranks[0][0].replica_id.unique_id


def fim(cursor: int) -> dict:
    return {"prompt": SOURCE[:cursor], "suffix": SOURCE[cursor : cursor + 200], "max_tokens": 8}


async def test_fim_requests_of_one_file_find_each_other(router):
    a, b = FakeReplica("a"), FakeReplica("b")
    router.update_replicas([a, b])
    first = await pick(router, [a, b], request(fim(3000)))
    for cursor in range(3010, 3400, 40):  # typing further down the file
        assert await pick(router, [a, b], request(fim(cursor))) == first
    assert router.policy.decisions["prefix"] == 10


async def test_a_saturated_replica_stops_receiving_affinity_traffic(router):
    a, b = FakeReplica("a"), FakeReplica("b")
    router.update_replicas([a, b])
    home = await pick(router, [a, b], request(fim(3000)))
    hot, cold = (a, b) if home == "a" else (b, a)
    hot.routing_stats["engine_waiting"] = 20  # its engine queue is over the limit (8)
    router.update_replicas([a, b])
    assert await pick(router, [a, b], request(fim(3050))) == cold.replica_id.unique_id
    assert router.policy.overrides["prefix"] == 1
    # So is a replica whose queue (as probed) is far above the other's.
    hot.routing_stats["engine_waiting"] = 0
    router.update_replicas([a, b])
    assert await pick(router, [a, b], request(fim(3100))) in ("a", "b")  # both warm now
    hot.queue_len = 9
    assert await pick(router, [a, b], request(fim(3150))) == cold.replica_id.unique_id


async def test_at_debug_level_each_decision_is_logged(router, demo_model_dir, caplog):
    a, b = FakeReplica("a"), FakeReplica("b")
    router.update_replicas([a, b])
    await pick(router, [a, b], request(fim(3000)))
    assert not [r for r in caplog.records if r.name == "engine.ray.router"]  # info: quiet
    engine_logger = logging.getLogger("engine")
    level = engine_logger.level
    try:
        router.initialize_state(model="demo", tokenizer=str(demo_model_dir), log_level="debug")
        router.prompts_loading.result(timeout=60)
        router.update_replicas([a, b])
        chosen = await pick(router, [a, b], request(fim(3000)))
    finally:
        engine_logger.setLevel(level)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "engine.ray.router"]
    assert line.startswith(f"routed to {chosen} by ") and "(guard None)" in line, line


async def test_routed_requests_count_as_load_until_the_next_probe(router, monkeypatch):
    monkeypatch.setattr(ray_router, "LOAD_PROBE_INTERVAL_S", 60.0)
    a, b = FakeReplica("a"), FakeReplica("b")
    router.update_replicas([a, b])
    home = await pick(router, [a, b], request(fim(3000)))
    probes = a.probes, b.probes
    other = "b" if home == "a" else "a"
    # Within one probe interval, a burst of one file's requests spills over once its
    # replica has max_imbalance (4) more in flight than the other; the other replica
    # then holds the file too, and being less loaded, takes the rest.
    picks = [await pick(router, [a, b], request(fim(3000 + i))) for i in range(1, 8)]
    assert picks == [home] * 4 + [other] * 3
    assert (a.probes, b.probes) == probes


async def test_a_burst_of_concurrent_decisions_sees_each_other(router):
    """Behind HAProxy, decisions run at once, each awaiting its own probe, and a
    routed request is counted by its replica only once HAProxy has forwarded it.
    Each decision must still see the ones made while its probe was in flight: one
    session's burst spills over once its replica is max_imbalance (4) ahead."""
    a, b = FakeReplica("a"), FakeReplica("b")
    router.update_replicas([a, b])
    for r in (a, b):
        r.hold_until = 8  # every probe stays in flight until all eight are sent
    plain = {"prompt": "def busy():", "max_tokens": 400}
    picks: list[str] = []  # in the order decided (nothing awaits after a decision)

    async def one() -> None:
        picks.append(await pick(router, [a, b], request(plain, session="hot")))

    await asyncio.gather(*(one() for _ in range(8)))  # all answer 0: none has arrived
    assert router._failures == 0 and min(a.probes, b.probes) >= 8
    home = picks[0]
    other = "b" if home == "a" else "a"
    assert picks == [home] * 5 + [other] * 3, picks
    assert router.policy.overrides["session"] == 1


async def test_session_header_then_user_field_keep_a_session_put(router):
    a, b = FakeReplica("a"), FakeReplica("b")
    router.update_replicas([a, b])
    plain = {"prompt": "def f():", "max_tokens": 4}
    by_header = {await pick(router, [a, b], request(plain, session="s1")) for _ in range(6)}
    by_user = {await pick(router, [a, b], request({**plain, "user": "u1"})) for _ in range(6)}
    assert len(by_header) == len(by_user) == 1
    assert router.policy.session_replica("s1") in by_header
    assert router.policy.session_replica("u1") in by_user


async def test_through_the_proxy_there_is_no_body_but_the_session_holds(router):
    a, b = FakeReplica("a"), FakeReplica("b")
    router.update_replicas([a, b])
    chosen = {await pick(router, [a, b], request(None, session="s2")) for _ in range(5)}
    assert len(chosen) == 1 and router.policy.decisions["prefix"] == 0


async def test_bad_bodies_and_unreported_replicas_are_balanced(router):
    a, b = FakeReplica("a"), FakeReplica("b")
    for r in (a, b):
        del r.routing_stats["block_size"]  # the engines have not reported yet
    router.update_replicas([a, b])
    await pick(router, [a, b], request(fim(3000)))
    await pick(router, [a, b], request({"prompt": 5}))
    assert router.policy.decisions == {"balance": 2}


async def test_while_the_tokenizer_loads_requests_are_balanced_not_held(
    demo_model_dir, monkeypatch
):
    loaded = threading.Event()
    real = ray_router.load_tokenizer

    def slow(*args):
        loaded.wait(30)
        return real(*args)

    monkeypatch.setattr(ray_router, "load_tokenizer", slow)
    r = CodeLlamaRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    r.initialize_state(model="demo", tokenizer=str(demo_model_dir))
    a, b = FakeReplica("a"), FakeReplica("b")
    r.update_replicas([a, b])
    await asyncio.wait_for(pick(r, [a, b], request(fim(3000))), 5)
    assert r.policy.decisions == {"balance": 1}
    loaded.set()
    r.prompts_loading.result(timeout=60)
    first = await pick(r, [a, b], request(fim(3000)))  # its blocks are now known
    assert await pick(r, [a, b], request(fim(3040))) == first
    assert r.policy.decisions == {"balance": 2, "prefix": 1}


async def test_a_replaced_replica_is_forgotten(router):
    a, b = FakeReplica("a"), FakeReplica("b")
    router.update_replicas([a, b])
    home = await pick(router, [a, b], request(fim(3000)))
    assert router.policy.held_blocks(home) > 0
    c = FakeReplica("c")
    survivors = [r for r in (a, b) if r.replica_id.unique_id != home] + [c]
    router.update_replicas(survivors)
    assert router.policy.held_blocks(home) == 0
    # An engine restart inside one replica (a new start time) empties its cache too.
    other = survivors[0]
    await pick(router, survivors, request(fim(5000)))
    other.routing_stats["engine_started_at"] = 2.0
    router.update_replicas(survivors)
    assert router.policy.held_blocks(other.replica_id.unique_id) == 0


async def test_routing_errors_never_fail_a_request(router, monkeypatch):
    a, b = FakeReplica("a"), FakeReplica("b")
    router.update_replicas([a, b])

    def broken(*_):
        raise RuntimeError("boom")

    monkeypatch.setattr(router.policy, "choose", broken)
    ranks = await router.choose_replicas([a, b], request(fim(3000)))
    assert len(ranks) == 1 and sorted(map(id, ranks[0])) == sorted(map(id, [a, b]))


def test_the_router_class_pickles_by_value():
    """Ray ships the request-router class to every process that routes, by value when
    the module is not importable there by reference: nothing unpicklable at module level
    (a module-level thread pool once made Ray refuse the deployment)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(ray_router)
    try:
        clone = cloudpickle.loads(cloudpickle.dumps(CodeLlamaRouter))
    finally:
        cloudpickle.unregister_pickle_by_value(ray_router)
    assert clone.__name__ == "CodeLlamaRouter"
