"""Prefix-cache- and session-aware routing through Ray Serve's request-router API.

`CodeLlamaRouter` is the deployment's `request_router_class`. Ray runs it in
every process that holds a handle to the deployment and asks it, per request,
which replica to use. Behind HAProxy (the default ingress) that process is the
application's ingress request router (Ray's `LLMRouter` deployment, which
HAProxy asks for each POST), and the request body is `pending_request.args[0]`;
through Ray's Python proxy the router sees no body, only the session header.

From the body it builds the routing key (`engine.routing_key`: the token ids
the engine will see, hashed in blocks of the engine's own block size) and the
session key; from Ray it takes each replica's queue length (probed, plus what it
routed there that the probe cannot have counted: `engine.routed_load`) and its
routing stats (`CodeLlamaServer.record_routing_stats`: block size, KV-cache size
and usage, engine queue, engine epoch); the decision itself is
`engine.prefix_routing`'s.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from engine.codellama import CodeLlamaPrompts
from engine.logs import configure_logging
from engine.prefix_routing import Decision, PolicyConfig, PrefixAffinity, ReplicaState
from engine.routed_load import RoutedLoad
from engine.routing_key import block_hashes, engine_prompt, session_key

log = logging.getLogger("engine.ray.router")

# A replica's probed queue length is used for this long (plus what was routed to it
# that the probe cannot have counted) before it is probed again.
LOAD_PROBE_INTERVAL_S = 0.1


class CodeLlamaRouter(RequestRouter):
    """Ray Serve request router: `engine.prefix_routing`'s decision for every request."""

    def initialize_state(
        self,
        model: str = "demo",
        tokenizer: str | None = None,
        revision: str | None = None,
        download_dir: str | None = None,
        max_imbalance: int = 4,
        max_imbalance_ratio: float = 1.25,
        session_affinity: bool = True,
        target_waiting_per_replica: float = 8.0,
        kv_cache_threshold: float = 0.9,
        max_prompt_chars: int | None = None,
        log_level: str = "info",
    ) -> None:
        configure_logging(log_level)  # the server's level: "debug" logs each decision
        self.policy = PrefixAffinity(
            PolicyConfig(max_imbalance, max_imbalance_ratio, session_affinity)
        )
        # From start-up, on a thread: until it is loaded, requests are balanced on load
        # alone rather than held (the first version loaded it on the first request, on
        # the event loop, and held a burst ~2 s).
        # (The thread is made here: Ray pickles this class, and a module-level executor
        # with it.)
        loader = ThreadPoolExecutor(1, thread_name_prefix="codellama-router-tokenizer")
        self.prompts_loading: Future[CodeLlamaPrompts] = loader.submit(
            _load_prompts, model, tokenizer, revision, download_dir
        )
        loader.shutdown(wait=False)  # its thread ends once the tokenizer is loaded
        self._waiting_limit = target_waiting_per_replica
        self._kv_limit = kv_cache_threshold
        self._max_chars = max_prompt_chars
        self.load = RoutedLoad()
        self._metrics = _RouterMetrics(self._deployment_id.app_name)
        self._failures = 0

    # -- Ray's hooks

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        try:
            chosen = await self._choose(candidate_replicas, pending_request)
        except Exception:  # never fail a request over routing: spread it instead
            self._failures += 1
            if self._failures == 1 or self._failures % 1000 == 0:
                log.exception("routing failed (%d times); routing at random", self._failures)
            return [random.sample(candidate_replicas, len(candidate_replicas))]
        rest = [r for r in candidate_replicas if r is not chosen]
        # Ray takes the first of the first rank (ingress router), or falls back along
        # the ranks when a replica refuses (proxy).
        return [[chosen], rest] if rest else [[chosen]]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.policy.sync(
            {
                _rid(r): (int(_stat(r, "kv_cache_blocks")), _stat(r, "engine_started_at"))
                for r in replicas
            }
        )
        self.load.keep({_rid(r) for r in replicas})

    # -- deciding

    async def _choose(
        self, candidates: list[RunningReplica], pending: PendingRequest | None
    ) -> RunningReplica:
        body = _body(pending)
        blocks = self._blocks(body, candidates)
        session = _session(pending, body)
        states = await self._states(candidates)
        # From here to the return nothing awaits: the next decision sees this one.
        decision = self.policy.choose(states, blocks, session)
        self.policy.record(decision, blocks, session)
        self.load.routed(decision.replica_id, time.monotonic())
        self._metrics.observe(decision)
        if log.isEnabledFor(logging.DEBUG):  # the decision log (--log-level debug)
            loads = {s.replica_id: (s.ongoing, s.saturated) for s in states}
            log.debug("routed to %s by %s (guard %s); ongoing, saturated: %s",
                      decision.replica_id, decision.reason, decision.guard, loads)  # fmt: skip
        return next(r for r in candidates if _rid(r) == decision.replica_id)

    def _blocks(
        self, body: Mapping[str, Any] | None, candidates: list[RunningReplica]
    ) -> list[int]:
        block_size = max((_stat(r, "block_size") for r in candidates), default=0)
        prompts = self.prompts
        # No body, no engine reported yet, or the tokenizer still loading.
        if body is None or block_size <= 0 or prompts is None:
            return []
        ids = engine_prompt(prompts, body, self._max_chars)
        return block_hashes(ids, int(block_size)) if ids else []

    async def _states(self, candidates: list[RunningReplica]) -> list[ReplicaState]:
        sent = time.monotonic()
        stale = [r for r in candidates if self.load.probe_due(_rid(r), sent, LOAD_PROBE_INTERVAL_S)]
        if stale:
            for replica, queue_len in await self._probe_queue_lens(stale, 0):
                if queue_len is not None:
                    self.load.probed(_rid(replica), sent, queue_len)
        return [self._state(r) for r in candidates]

    def _state(self, replica: RunningReplica) -> ReplicaState:
        ongoing = self.load.ongoing(_rid(replica))
        saturated = (
            ongoing >= replica.max_ongoing_requests
            or _stat(replica, "engine_waiting") >= self._waiting_limit
            or _stat(replica, "kv_cache_usage") >= self._kv_limit
        )
        return ReplicaState(_rid(replica), ongoing, saturated)

    @property
    def prompts(self) -> CodeLlamaPrompts | None:
        """Code Llama's prompt formats on the model's tokenizer; None while it loads (a
        failed load raises here, and `choose_replicas` routes at random and logs it)."""
        loading = self.prompts_loading
        return loading.result() if loading.done() else None


def _load_prompts(
    model: str, tokenizer: str | None, revision: str | None, download_dir: str | None
) -> CodeLlamaPrompts:
    return CodeLlamaPrompts(load_tokenizer(model, tokenizer, revision, download_dir))


def load_tokenizer(
    model: str, tokenizer: str | None, revision: str | None, download_dir: str | None
) -> Any:
    """The Hugging Face tokenizer the engine loads for `model` (vLLM uses the same)."""
    from transformers import AutoTokenizer

    from engine.config import DEMO_MODEL
    from engine.demo_model import ensure_demo_model

    source = tokenizer or (str(ensure_demo_model()) if model == DEMO_MODEL else model)
    return AutoTokenizer.from_pretrained(source, revision=revision, cache_dir=download_dir)


def _rid(replica: RunningReplica) -> str:
    return str(replica.replica_id.unique_id)


def _stat(replica: RunningReplica, name: str) -> float:
    """A number from the replica's routing stats (0 until it has reported)."""
    value = replica.routing_stats.get(name, 0)
    return float(value) if isinstance(value, int | float) else 0.0


def _body(pending: PendingRequest | None) -> Mapping[str, Any] | None:
    """The request body when Ray hands it over (the ingress router's parsed JSON)."""
    if pending is None or not pending.args:
        return None
    arg = pending.args[0]
    if isinstance(arg, SimpleNamespace):
        return vars(arg)
    return arg if isinstance(arg, Mapping) else None


def _session(pending: PendingRequest | None, body: Mapping[str, Any] | None) -> str | None:
    header = pending.metadata.session_id if pending is not None else None
    return header or (session_key(body) if body is not None else None)


class _RouterMetrics:
    """The router's decisions as Ray metrics (exported by each node's metrics agent)."""

    def __init__(self, app: str) -> None:
        from ray.util.metrics import Counter

        self.decisions = Counter(
            "codellama_serve_router_decisions",
            description="Routing decisions by reason (session, prefix, balance) and by the "
            "load guard's override (none, session, prefix).",
            tag_keys=("application", "reason", "guard"),
        )
        self.matched_blocks = Counter(
            "codellama_serve_router_matched_blocks",
            description="Prompt blocks the chosen replica was believed to hold.",
            tag_keys=("application",),
        )
        self.app = app

    def observe(self, decision: Decision) -> None:
        tags = {
            "application": self.app,
            "reason": decision.reason,
            "guard": decision.guard or "none",
        }
        self.decisions.inc(1, tags=tags)
        if decision.matched_blocks:
            self.matched_blocks.inc(decision.matched_blocks, tags={"application": self.app})
