"""The one source of settings: CLI flags, env vars and a YAML file.

Every field of every section below is a flag (`--max-num-seqs`), an env var
(`CODELLAMA_SERVE_MAX_NUM_SEQS`) and a key of its section in the YAML file
(`engine: {max_num_seqs: ...}`). Precedence: flag > env var > file > default.
Engine flags keep vLLM's names so that vLLM users feel at home.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.adapters import AdapterError, check_adapter_name

ENV_PREFIX = "CODELLAMA_SERVE_"
DEMO_MODEL = "demo"  # what `--model` says for the embedded demo model
DEMO_MODEL_NAME = "codellama-serve-demo"  # the name clients see for it
DEMO_LORA = "demo"  # a --lora-modules path: the demo model's own adapter (engine/demo_lora.py)
REAL_MODEL = "codellama/CodeLlama-13b-Instruct-hf"
DEMO_MAX_MODEL_LEN = 2048
CODELLAMA_MAX_MODEL_LEN = 16384
# Through Ray's proxy every streamed write is a message between actors (~0.35 ms of CPU
# each, docs/performance.md); a local socket write is cheap.
RAY_STREAM_COALESCE_MS = 100.0
# Ray's HAProxy ingress forwards straight to the replicas' own HTTP servers: a stream's
# writes are socket writes, as standalone (docs/performance.md, "Ingress modes").
DEFAULT_RAY_INGRESS = "haproxy"

Mode = Literal["standalone", "ray"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(Section):
    """The vLLM engine: what model, how it is laid out, how it batches."""

    model: str | None = Field(
        None,
        description="Model name on the Hugging Face hub or local path. Default: "
        f"{REAL_MODEL} when a GPU is present, the embedded demo model ('{DEMO_MODEL}') "
        "otherwise.",
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer name or path (default: the model's)."
    )
    revision: str | None = Field(None, description="Model revision (branch, tag or commit).")
    served_model_name: str | None = Field(
        None, description="Name clients use in the `model` field (default: the model name)."
    )
    download_dir: str | None = Field(None, description="Where to download and cache weights.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto",
        description="Weight and activation dtype (auto: the checkpoint's; float32 for the demo "
        "model, which vLLM would otherwise run in bfloat16).",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="GPUs per replica (tensor parallel)."
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="Context window in tokens (prompt + output). Default: 16384 for Code Llama, "
        "2048 for the demo model.",
    )
    max_num_seqs: int = Field(256, ge=1, description="Most sequences batched in one engine step.")
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="Most tokens in one engine step (default: vLLM's)."
    )
    gpu_memory_utilization: float = Field(
        0.90, gt=0.0, le=1.0, description="Fraction of each GPU's memory vLLM may use."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache across shared prefixes.")
    enable_chunked_prefill: bool = Field(True, description="Split long prefills across steps.")
    enforce_eager: bool = Field(
        False, description="Disable CUDA graphs / compilation (always on for CPU)."
    )
    seed: int = Field(0, description="Engine random seed.")
    cpu_kvcache_space_gib: float = Field(
        1.0, gt=0, description="KV cache size in GiB when running on CPU."
    )
    max_logprobs: int = Field(20, ge=0, le=20, description="Most logprobs a request may ask for.")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="How tensor-parallel workers run: 'mp' or 'ray' (default: vLLM's choice)."
    )


class ModelFeaturesConfig(Section):
    """What the API offers for this checkpoint."""

    chat: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Serve /v1/chat/completions with the Code Llama Instruct template. "
        "auto: on for Instruct checkpoints and the demo model.",
    )
    infill: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Accept `suffix` (fill-in-the-middle). auto: on when the tokenizer has the "
        "infill tokens and the checkpoint is a 7B/13B non-Python model.",
    )


class ServerConfig(Section):
    """The HTTP server."""

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    access_log: bool = Field(
        True, description="Log one JSON line per request (id, status, tokens, latencies)."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 past it)."
    )
    max_n: int = Field(16, ge=1, le=128, description="Largest `n` (completions per prompt).")
    max_prompts_per_request: int = Field(
        64, ge=1, description="Most prompts in one /v1/completions request."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="A request running longer is aborted with an error."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    stream_coalesce_ms: float | None = Field(
        None,
        ge=0,
        le=1000,
        description="Streaming: send a request's frames together at most this often (the "
        "first at once, the last with the end); fewer, larger writes where each one is costly. "
        "Default: 100 in Ray Serve behind the Python proxy (ray_ingress proxy), where every "
        "write is a message between actors; 0 otherwise.",
    )


class AuthConfig(Section):
    """API keys and per-key rate limits."""

    api_keys: str | None = Field(
        None,
        description="Comma-separated API keys (or 'sha256:<hex>' hashes). With no keys from "
        "here or --api-keys-file, the API is open.",
        repr=False,
    )
    api_keys_file: str | None = Field(
        None,
        description="File of API keys, one per line: '<key>' or 'sha256:<hex>', optionally "
        "followed by ' name=<label> rpm=<n> tpm=<n>' (e.g. a mounted Kubernetes Secret).",
    )
    auth_open_ops_endpoints: bool = Field(
        True, description="Leave /health, /ready and /metrics open for probes and scraping."
    )
    rate_limit_rpm: int | None = Field(
        None, ge=1, description="Default requests per minute per key (none: unlimited)."
    )
    rate_limit_tpm: int | None = Field(
        None,
        ge=1,
        description="Default tokens (prompt + completion) per minute per key (none: unlimited).",
    )


class AdmissionConfig(Section):
    """How much waiting work the server accepts before refusing with 429."""

    max_waiting_requests: int = Field(
        256,
        ge=0,
        description="Sequences allowed to wait beyond the engine's batch (--max-num-seqs); "
        "past it new requests get 429 with Retry-After.",
    )
    max_waiting_prompt_tokens: int = Field(
        262_144,
        ge=1,
        description="Prompt tokens allowed to wait for prefill (a non-streamed request's count "
        "until it finishes); past it new requests get 429.",
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429 and 503.")


PRIORITY_CLASS_NAME = r"[a-z][a-z0-9_-]{0,31}"
MAX_PRIORITY_CLASSES = 8  # each is a label value of the per-class metrics


@dataclass(frozen=True, slots=True)
class PriorityClassSpec:
    """One priority class as the settings define it."""

    name: str
    priority: int  # vLLM's request priority: lower is served first
    queue_share: float  # share of the waiting queue its requests may fill (priority mode)


def parse_priority_classes(text: str) -> list[PriorityClassSpec]:
    """`"interactive priority=0 queue_share=1, batch priority=20 queue_share=0.5"`,
    highest priority first (ValueError saying what is wrong)."""
    specs: list[PriorityClassSpec] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, *options = entry.split()
        if not re.fullmatch(PRIORITY_CLASS_NAME, name):
            raise ValueError(f"class name {name!r} must match {PRIORITY_CLASS_NAME}")
        values = dict(o.partition("=")[::2] for o in options)
        if set(values) - {"priority", "queue_share"} or "priority" not in values:
            raise ValueError(f"class {name!r}: give priority=<int> [queue_share=<0..1>]")
        try:
            spec = PriorityClassSpec(
                name, int(values["priority"]), float(values.get("queue_share", 1.0))
            )
        except ValueError:
            raise ValueError(
                f"class {name!r}: priority is an integer, queue_share a number"
            ) from None
        if not 0.0 <= spec.queue_share <= 1.0:
            raise ValueError(f"class {name!r}: queue_share must lie in [0, 1]")
        specs.append(spec)
    specs.sort(key=lambda c: c.priority)
    _check_class_table(specs)
    return specs


def _check_class_table(specs: list[PriorityClassSpec]) -> None:
    if not 1 <= len(specs) <= MAX_PRIORITY_CLASSES:
        raise ValueError(f"give 1 to {MAX_PRIORITY_CLASSES} classes")
    for kind, values in (
        ("names", [c.name for c in specs]),
        ("priorities", [c.priority for c in specs]),
    ):
        if len(set(values)) != len(values):
            raise ValueError(f"class {kind} must be unique")
    if specs[0].queue_share != 1.0:
        raise ValueError(f"the highest class ({specs[0].name}) must have queue_share=1")
    for upper, lower in itertools.pairwise(specs):
        if lower.queue_share > upper.queue_share:
            raise ValueError(
                f"class {lower.name!r} may not have more of the queue than {upper.name!r} above it"
            )


class PriorityConfig(Section):
    """Priority classes (per API key and per request) and fair share across keys."""

    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs",
        description="vLLM's scheduling policy. priority: each request runs at its class's "
        "engine priority (lower first; under KV-cache pressure the engine preempts the lowest "
        "first), and admission keeps queue headroom per class and a weighted fair share per "
        "API key. fcfs: first come, first served; classes only label metrics.",
    )
    priority_classes: str = Field(
        "interactive priority=0 queue_share=1, default priority=10 queue_share=0.75, "
        "batch priority=20 queue_share=0.5",
        description="The classes: '<name> priority=<int> queue_share=<0..1>', comma-separated. "
        "priority is vLLM's (lower is served first); queue_share is the part of the waiting "
        "queue (--max-waiting-requests) a class's requests may fill, the rest being headroom "
        "for the classes above it.",
    )
    default_priority_class: str = Field(
        "default", description="Class of keys without 'priority=' (and of an open API)."
    )
    fim_priority_class: str | None = Field(
        None,
        description="Class for fill-in-the-middle requests (suffix set, max_tokens at most "
        "--fim-priority-max-tokens) from keys without a class that ask for none. none: off.",
    )
    fim_priority_max_tokens: int = Field(
        64, ge=1, description="Largest max_tokens of a FIM request --fim-priority-class takes."
    )
    fair_share_window_s: float = Field(
        5.0,
        gt=0,
        description="How long a key refused for its class's bound or its fair share keeps its "
        "share of the class reserved (priority mode).",
    )

    @field_validator("priority_classes")
    @classmethod
    def _classes_parse(cls, v: str) -> str:
        parse_priority_classes(v)
        return v

    @model_validator(mode="after")
    def _named_classes_exist(self) -> PriorityConfig:
        names = [c.name for c in self.classes()]
        for setting in ("default_priority_class", "fim_priority_class"):
            name = getattr(self, setting)
            if name is not None and name not in names:
                raise ValueError(f"{setting} {name!r} is not one of the classes {names}")
        return self

    def classes(self) -> list[PriorityClassSpec]:
        """The classes, highest priority (lowest value) first."""
        return parse_priority_classes(self.priority_classes)


class ConnectionsConfig(Section):
    """Client connections: how many, how long they may idle, how slowly they may read."""

    limit_concurrency: int | None = Field(
        8192,
        ge=1,
        description="Most open connections (idle keep-alive ones included) or requests at "
        "once; past it new requests get 503 (uvicorn's --limit-concurrency). The server "
        "raises its file-descriptor limit to fit. none: bounded only by file descriptors.",
    )
    timeout_keep_alive_s: float = Field(
        30.0,
        gt=0,
        description="Close a keep-alive connection after this long idle (uvicorn's "
        "--timeout-keep-alive).",
    )
    backlog: int = Field(
        2048, ge=1, description="Connections the kernel queues before the server accepts them."
    )
    stream_write_timeout_s: float | None = Field(
        30.0,
        gt=0,
        description="A stream whose client takes no data for this long (it stopped reading "
        "while its generation runs) is aborted in the engine and its connection closed. "
        "none: wait for the client forever.",
    )
    socket_send_buffer_bytes: int | None = Field(
        None,
        ge=4096,
        description="Kernel send buffer of each client connection (SO_SNDBUF; none: the "
        "kernel's, autotuned up to net.ipv4.tcp_wmem's maximum). What a client that stops "
        "reading can hold in the kernel; a smaller one shows the stall to "
        "--stream-write-timeout-s sooner.",
    )


class TracingConfig(Section):
    """OpenTelemetry traces: one span per API request, with its engine phases as children."""

    otlp_traces_endpoint: str | None = Field(
        None,
        description="Where to send OpenTelemetry traces over OTLP (vLLM's flag), e.g. "
        "grpc://collector:4317, or http://collector:4318/v1/traces with "
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf. The standard OTEL_* variables set "
        "the service name, headers, protocol and sampler. none: no tracing.",
    )
    otlp_traces_prompts: bool = Field(
        False,
        description="Add each request's prompt text (as the engine saw it) to its span. Off: "
        "spans carry token counts, never prompt text.",
    )


class LoRAModule(BaseModel):
    """One adapter the server loads at start (vLLM's --lora-modules entry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The name clients send in `model`.")
    path: str = Field(
        min_length=1,
        description=f"Directory of a PEFT LoRA adapter ('{DEMO_LORA}': the demo model's).",
    )
    base_model_name: str | None = Field(
        None, description="The served base model it adapts (default: the one served)."
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        try:
            return check_adapter_name(name)
        except AdapterError as e:
            raise ValueError(str(e)) from None


# vLLM's accepted LoRA ranks (vllm.config.lora.MaxLoRARanks).
LoRARank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]


class LoRAConfig(Section):
    """LoRA adapters on the one base model: `model` selects one (vLLM's flags)."""

    enable_lora: bool = Field(False, description="Serve LoRA adapters.")
    lora_modules: list[LoRAModule] = Field(
        default_factory=list,
        description="Adapters to load at start, as vLLM takes them: 'name=path' items or "
        'JSON objects ({"name": "sql", "path": "/models/sql-lora", "base_model_name": ...}), '
        "or a JSON list of them.",
    )
    max_loras: int = Field(1, ge=1, description="Most adapters in one engine batch.")
    max_lora_rank: LoRARank = Field(16, description="Largest adapter rank accepted.")
    max_cpu_loras: int | None = Field(
        None,
        ge=1,
        description="Most adapters held at once (loads past it are refused). Default: "
        "the number of --lora-modules, plus --max-loras with runtime updating; at least "
        "--max-loras.",
    )
    allow_runtime_lora_updating: bool = Field(
        False,
        description="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter for API "
        "keys marked 'admin' (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING). Standalone only.",
    )

    @field_validator("lora_modules", mode="before")
    @classmethod
    def _vllm_syntax(cls, value: Any) -> Any:
        return parse_lora_modules(value)

    @model_validator(mode="after")
    def _consistent(self) -> LoRAConfig:
        if not self.enable_lora and (self.lora_modules or self.allow_runtime_lora_updating):
            raise ValueError("--lora-modules and --allow-runtime-lora-updating need --enable-lora")
        names = [m.name for m in self.lora_modules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"lora_modules: duplicate adapter names {', '.join(duplicates)}")
        held = self.max_cpu_loras
        if held is not None and held < max(self.max_loras, len(names)):
            raise ValueError(
                f"max_cpu_loras ({held}) must be at least max_loras ({self.max_loras}) "
                f"and the number of lora_modules ({len(names)})"
            )
        return self


def parse_lora_modules(value: Any) -> Any:
    """vLLM's --lora-modules forms: 'name=path', a JSON object, a JSON list of them;
    several in one string (an env var) separated by whitespace. Mappings pass as they are."""
    if value is None:
        return []
    if isinstance(value, str | dict):
        value = [value]
    if not isinstance(value, list):
        return value  # pydantic reports the type
    out: list[Any] = []
    for item in value:
        if isinstance(item, str):
            out.extend(_parse_lora_module_text(item))
        else:
            out.append(item)
    return out


def _parse_lora_module_text(text: str) -> list[Any]:
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON in lora_modules: {e.msg}") from None
        return parsed if isinstance(parsed, list) else [parsed]
    out: list[Any] = []
    for item in text.split():
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"lora_modules item {item!r}: expected 'name=path' or JSON")
        out.append({"name": name, "path": path})
    return out


class RayConfig(Section):
    """Cluster mode: Ray Serve replicas, placement and autoscaling (`serve --ray`)."""

    ray_address: str | None = Field(
        None, description="Ray cluster to join ('auto', 'ray://host:10001'); none: start one."
    )
    ray_app_name: str = Field("codellama", description="Ray Serve application name.")
    ray_route_prefix: str = Field("/", description="HTTP route prefix of the application.")
    ray_http_host: str = Field("0.0.0.0", description="Where Ray Serve's HTTP proxy binds.")
    ray_http_port: int = Field(8000, ge=1, le=65535, description="Ray Serve's HTTP proxy port.")
    ray_use_gpu: bool | None = Field(
        None,
        description="Give replicas GPUs (tensor-parallel placement groups). none: yes unless "
        "the model is the demo model (or, with no model set, if the cluster has GPUs).",
    )
    accelerator_type: str | None = Field(
        "A100",
        description="GPU type each replica's workers need (Ray accelerator type; none: any). "
        "Ignored on CPU.",
    )
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (each owns one engine).")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time.")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    target_ongoing_requests: float | None = Field(
        None,
        gt=0,
        description="Ongoing requests per replica the autoscaler aims for "
        "(default: 80% of --max-num-seqs).",
    )
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Requests Ray routes to one replica at once "
        "(default: --max-num-seqs + --max-waiting-requests).",
    )
    target_waiting_per_replica: float = Field(
        8.0,
        gt=0,
        description="Engine queue depth per replica that calls for another replica "
        "(custom autoscaling signal).",
    )
    target_interactive_waiting_per_replica: float | None = Field(
        2.0,
        gt=0,
        description="Waiting sequences (admitted, no first token yet) of the highest-priority "
        "class per replica that call for another replica. none: off.",
    )
    kv_cache_scale_up_threshold: float = Field(
        0.90,
        gt=0,
        le=1,
        description="KV-cache usage above which a replica counts as saturated.",
    )
    upscale_delay_s: float = Field(15.0, ge=0, description="Sustained load before scaling up.")
    downscale_delay_s: float = Field(
        120.0, ge=0, description="Sustained idleness before scaling down."
    )
    autoscaling_look_back_s: float = Field(
        15.0, gt=0, description="Window over which load is averaged."
    )
    replica_num_cpus: float = Field(
        1.0, ge=0, description="CPUs Ray reserves for each replica's HTTP/driver actor."
    )
    ray_metrics_port: int | None = Field(
        9400,
        ge=1,
        le=65535,
        description="Port where each replica serves its own /metrics, /health and /ready "
        "(through Ray's proxy they reach one replica at random). none: off.",
    )
    health_check_period_s: float = Field(5.0, gt=0, description="How often Ray checks replicas.")
    health_check_timeout_s: float = Field(15.0, gt=0, description="Replica health check timeout.")

    @model_validator(mode="after")
    def _replica_bounds(self) -> RayConfig:
        initial = self.initial_replicas
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})"
            )
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({initial}) must lie in [min_replicas, max_replicas]"
            )
        return self


class RoutingConfig(Section):
    """Cluster mode: how requests enter Ray Serve and which replica serves each."""

    ray_ingress: Literal["haproxy", "proxy"] | None = Field(
        None,
        description="How HTTP reaches the replicas. haproxy: Ray's HAProxy ingress on every "
        "node forwards to the replicas' own HTTP servers (direct ingress), asking the "
        "application's ingress request router where each POST goes; proxy: Ray's Python HTTP "
        "proxy actors, every streamed frame a message between actors. Default: haproxy "
        "(docs/performance.md). `serve --ray` starts its Ray with it; a cluster you join "
        "(or KubeRay) must be started with its env (RAY_SERVE_ENABLE_HA_PROXY=1, see README).",
    )
    ray_app_thread: bool = Field(
        False,
        description="Run the app on a thread of its own in each replica (Ray Serve's default, "
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1), so that every ASGI message crosses "
        "threads. Off: the app shares the replica's event loop with Ray's HTTP server, as "
        "standalone (docs/performance.md); Ray's health checks then wait for the app's loop.",
    )
    ray_router: Literal["codellama", "default", "ray_prefix"] = Field(
        "codellama",
        description="Which replica serves a request. codellama: prefix-cache and session "
        "affinity on the prompt as the engine sees it, bounded by load (engine.prefix_routing; "
        "prefix affinity needs the haproxy ingress, which hands it the body); default: Ray's "
        "(HAProxy's leastconn, or power of two choices through the proxy); ray_prefix: "
        "ray.serve.llm's PrefixCacheAffinityRouter (haproxy ingress only).",
    )
    routing_max_imbalance: int = Field(
        4,
        ge=0,
        description="Affinity may send a request to a replica with at most this many more "
        "requests than the least loaded one (or the ratio below, whichever allows more).",
    )
    routing_max_imbalance_ratio: float = Field(
        1.25,
        ge=1.0,
        description="... or with at most this many times the least loaded replica's requests.",
    )
    routing_session_affinity: bool = Field(
        True,
        description="Keep a session (X-Session-Id header, else the OpenAI `user` field) on "
        "one replica while it is not saturated or over the imbalance bound.",
    )

    @model_validator(mode="after")
    def _router_needs_ingress(self) -> RoutingConfig:
        if self.ray_router == "ray_prefix" and self.ray_ingress == "proxy":
            raise ValueError(
                "ray_router ray_prefix reads the request body, which only the haproxy ingress "
                "hands to a router"
            )
        return self


# ---------------------------------------------------------------- decoding


def _json_object(value: Any) -> Any:
    # A flag gives the JSON as text; the file and env vars give a mapping already.
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e})") from None
    return value


class _SpeculationBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_speculative_tokens: int | None = Field(
        None, ge=1, le=64, description="Tokens proposed per step."
    )


class NgramSpeculation(_SpeculationBase):
    """vLLM's n-gram proposer: drafts the tokens that followed the last n-gram's
    earlier occurrence in the prompt or output (prompt lookup decoding)."""

    method: Literal["ngram"]
    num_speculative_tokens: int = Field(ge=1, le=64, description="Tokens proposed per step.")
    prompt_lookup_max: int | None = Field(None, ge=1, description="Longest n-gram matched.")
    prompt_lookup_min: int | None = Field(None, ge=1, description="Shortest n-gram matched.")

    @model_validator(mode="after")
    def _lookup_bounds(self) -> NgramSpeculation:
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if low is not None and high is not None and low > high:
            raise ValueError(f"prompt_lookup_min ({low}) > prompt_lookup_max ({high})")
        return self


class SuffixSpeculation(_SpeculationBase):
    """vLLM's suffix decoding (Arctic Inference's suffix trees over the prompt and
    earlier outputs); needs the `arctic-inference` package."""

    method: Literal["suffix"]
    suffix_decoding_max_tree_depth: int | None = Field(None, ge=1)
    suffix_decoding_max_cached_requests: int | None = Field(None, ge=0)
    suffix_decoding_max_spec_factor: float | None = Field(None, ge=0)
    suffix_decoding_min_token_prob: float | None = Field(None, ge=0, le=1)


# The speculative methods that need no second model (draft model, EAGLE head, MTP
# weights): what suits code editing, where the output repeats the input.
SPECULATIVE_METHODS = ("ngram", "suffix")
Speculation = Annotated[NgramSpeculation | SuffixSpeculation, Field(discriminator="method")]


class StructuredOutputsEngineConfig(BaseModel):
    """vLLM's engine-wide structured-output options (`--structured-outputs-config`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer"] = Field(
        "auto", description="Grammar engine (auto: xgrammar, falling back per request)."
    )
    disable_any_whitespace: bool = Field(
        False,
        description="JSON output without whitespace between tokens (xgrammar, guidance only).",
    )
    disable_additional_properties: bool = Field(
        False, description="guidance only: no additionalProperties unless the schema says so."
    )

    @model_validator(mode="after")
    def _backend_options(self) -> StructuredOutputsEngineConfig:
        # vLLM's own rules, checked here so a bad combination fails at start-up.
        if self.disable_any_whitespace and self.backend not in ("xgrammar", "guidance"):
            raise ValueError("disable_any_whitespace needs backend 'xgrammar' or 'guidance'")
        if self.disable_additional_properties and self.backend != "guidance":
            raise ValueError("disable_additional_properties needs backend 'guidance'")
        return self


class DecodingConfig(Section):
    """Speculative decoding and structured outputs (vLLM's JSON options)."""

    speculative_config: Speculation | None = Field(
        None,
        description="Speculative decoding, as vLLM's JSON, with a method that needs no second "
        'model: \'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}\' '
        'or \'{"method": "suffix"}\' (needs arctic-inference). none: off.',
    )
    structured_outputs_config: StructuredOutputsEngineConfig | None = Field(
        None,
        description="Structured outputs for the whole engine, as vLLM's JSON: "
        '\'{"backend": "xgrammar", "disable_any_whitespace": true}\'. none: vLLM\'s defaults.',
    )

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _speculation(cls, value: Any) -> Any:
        value = _json_object(value)
        if isinstance(value, dict):
            method = value.get("method")
            if "model" in value or method not in SPECULATIVE_METHODS:
                raise ValueError(
                    f"method {method!r} is not supported: only the methods that need no "
                    f"second model are ({', '.join(SPECULATIVE_METHODS)}), without 'model'"
                )
        return value

    @field_validator("structured_outputs_config", mode="before")
    @classmethod
    def _structured(cls, value: Any) -> Any:
        return _json_object(value)


class Settings(Section):
    engine: EngineConfig = Field(default_factory=EngineConfig)
    features: ModelFeaturesConfig = Field(default_factory=ModelFeaturesConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    priority: PriorityConfig = Field(default_factory=PriorityConfig)
    connections: ConnectionsConfig = Field(default_factory=ConnectionsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)


def sections() -> dict[str, type[Section]]:
    """Section name -> model class, in the order `--help` shows them."""
    out: dict[str, type[Section]] = {}
    for name, f in Settings.model_fields.items():
        model = f.annotation
        assert isinstance(model, type) and issubclass(model, Section)
        out[name] = model
    return out


def _check_flat_names_unique() -> None:
    # Flags and env vars are flat, so a field name may live in one section only.
    seen: set[str] = set()
    for model in sections().values():
        for name in model.model_fields:
            if name in seen:
                raise AssertionError(f"setting {name!r} is defined in two sections")
            seen.add(name)


_check_flat_names_unique()


def env_var(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def load_yaml(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


class ConfigError(ValueError):
    """Settings that cannot be used, with a message meant for the user."""


def build_settings(
    file_values: dict[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Settings:
    """Merge defaults < file < env < overrides (flat field names) into Settings."""
    env = os.environ if env is None else env
    merged: dict[str, dict[str, Any]] = {}
    file_values = dict(file_values or {})
    for section, model in sections().items():
        values = dict(file_values.pop(section, None) or {})
        for name in model.model_fields:
            raw = env.get(env_var(name))
            if raw is not None and raw != "":
                values[name] = _parse_env(raw)
        for name, value in (overrides or {}).items():
            if name in model.model_fields:
                values[name] = value
        merged[section] = values
    if file_values:
        raise ConfigError(f"unknown config sections: {', '.join(sorted(file_values))}")
    try:
        return Settings.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def _parse_env(raw: str) -> Any:
    # YAML scalars give env vars the same typing as the file: 1, 0.5, true, null.
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        loc = [str(p) for p in e["loc"]]
        # [section, setting, ...]: a setting holding JSON reports the key inside it too
        # (without the method tag of a union such as speculative_config's).
        name = loc[1] if len(loc) > 1 else (loc[0] if loc else "settings")
        within = ".".join(p for p in loc[2:] if p not in SPECULATIVE_METHODS)
        flag = f"--{name.replace('_', '-')} ({env_var(name)})"
        if e["type"] == "extra_forbidden" and len(loc) > 2:
            lines.append(f"{flag}: {within}: unknown key")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{'.'.join(loc)}: unknown setting")
        elif len(loc) < 2:  # a check across a whole section
            lines.append(f"{name}: {e['msg']}")
        else:
            where = f" {within}:" if within else ""
            lines.append(f"{flag}:{where} {e['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)


# ---------------------------------------------------------------- resolution


class ResolvedSettings(BaseModel):
    """The settings with every default worked out, for one mode on one kind of machine.

    What a setting means when left unset (the model, its context window, the dtype,
    frame coalescing, the executor, Ray's routing bounds) is decided here and only
    here; every mode reads this object.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: Settings
    gpu: bool
    mode: Mode

    @property
    def engine(self) -> EngineConfig:
        return self.settings.engine

    @property
    def features(self) -> ModelFeaturesConfig:
        return self.settings.features

    @property
    def server(self) -> ServerConfig:
        return self.settings.server

    @property
    def auth(self) -> AuthConfig:
        return self.settings.auth

    @property
    def admission(self) -> AdmissionConfig:
        return self.settings.admission

    @property
    def priority(self) -> PriorityConfig:
        return self.settings.priority

    @property
    def connections(self) -> ConnectionsConfig:
        return self.settings.connections

    @property
    def tracing(self) -> TracingConfig:
        return self.settings.tracing

    @property
    def lora(self) -> LoRAConfig:
        return self.settings.lora

    @property
    def ray(self) -> RayConfig:
        return self.settings.ray

    @property
    def routing(self) -> RoutingConfig:
        return self.settings.routing

    @property
    def decoding(self) -> DecodingConfig:
        return self.settings.decoding

    @property
    def model(self) -> str:
        """The model to load: a hub name, a path, or 'demo' (set once resolved)."""
        assert self.engine.model is not None
        return self.engine.model

    @property
    def served_model_name(self) -> str:
        """The name clients send in `model` (set once resolved)."""
        assert self.engine.served_model_name is not None
        return self.engine.served_model_name

    @property
    def is_demo(self) -> bool:
        return self.model == DEMO_MODEL

    @property
    def stream_coalesce_s(self) -> float:
        """How long a stream's frames may be held to go together (0: never)."""
        assert self.server.stream_coalesce_ms is not None
        return self.server.stream_coalesce_ms / 1000

    @property
    def max_admitted_sequences(self) -> int:
        """Sequences admitted at once: the engine's batch plus the waiting queue."""
        return self.engine.max_num_seqs + self.admission.max_waiting_requests


def resolve(settings: Settings, *, gpu: bool, mode: Mode = "standalone") -> ResolvedSettings:
    """Work out every default of `settings` (pure: same input, same output).

    `gpu`: whether the engine gets GPUs (standalone: the machine has one; Ray: the
    replicas are given some). Resolving resolved settings changes nothing.
    """
    e, a, s, r = settings.engine, settings.admission, settings.server, settings.ray
    routing = settings.routing.model_copy(
        update={"ray_ingress": settings.routing.ray_ingress or DEFAULT_RAY_INGRESS}
    )
    model = e.model or (REAL_MODEL if gpu else DEMO_MODEL)
    demo = model == DEMO_MODEL
    engine = e.model_copy(
        update={
            "model": model,
            "served_model_name": e.served_model_name or (DEMO_MODEL_NAME if demo else model),
            "max_model_len": e.max_model_len
            or (DEMO_MAX_MODEL_LEN if demo else CODELLAMA_MAX_MODEL_LEN),
            # vLLM's "auto" runs the float32 demo checkpoint in bfloat16, ~2.5x slower
            # on CPUs without AMX (oneDNN falls back).
            "dtype": "float32" if demo and e.dtype == "auto" else e.dtype,
            # No CUDA graphs without CUDA.
            "enforce_eager": e.enforce_eager or not gpu,
            # In Ray, tensor-parallel workers go in the replica's placement group;
            # on CPU the engine runs in the replica's child processes.
            "distributed_executor_backend": e.distributed_executor_backend
            or (("ray" if gpu else "mp") if mode == "ray" else None),
        }
    )
    coalesce = s.stream_coalesce_ms
    server = s.model_copy(
        update={
            "stream_coalesce_ms": coalesce
            if coalesce is not None
            else (
                RAY_STREAM_COALESCE_MS if mode == "ray" and routing.ray_ingress == "proxy" else 0.0
            )
        }
    )
    target = r.target_ongoing_requests
    ongoing = r.max_ongoing_requests
    ray = r.model_copy(
        update={
            "ray_use_gpu": gpu if mode == "ray" else r.ray_use_gpu,
            # Ray's default target (2) would scale an LLM replica out long before its
            # batch fills: aim a little below the batch.
            "target_ongoing_requests": target
            if target is not None
            else max(1.0, round(0.8 * e.max_num_seqs, 1)),
            "max_ongoing_requests": ongoing
            if ongoing is not None
            else e.max_num_seqs + a.max_waiting_requests,
        }
    )
    lora = _resolve_lora(settings.lora, engine.served_model_name or model, demo, mode)
    resolved = settings.model_copy(
        update={"engine": engine, "server": server, "lora": lora, "ray": ray, "routing": routing}
    )
    return ResolvedSettings(settings=resolved, gpu=gpu, mode=mode)


def _resolve_lora(lora: LoRAConfig, served_name: str, demo: bool, mode: Mode) -> LoRAConfig:
    """How many adapters the server holds, and what no adapter may be called."""
    if mode == "ray" and lora.allow_runtime_lora_updating:
        # Through Ray's proxy a load would reach one replica at random, and replicas
        # started later would never see it: in Ray, adapters are --lora-modules.
        raise ConfigError(
            "--allow-runtime-lora-updating works standalone only: in Ray Serve, list the "
            "adapters every replica loads in --lora-modules"
        )
    for m in lora.lora_modules:
        if m.path == DEMO_LORA and not demo:
            raise ConfigError(
                f"lora_modules: {m.name!r}: the demo adapter fits only the demo model"
            )
        if m.name == served_name:
            raise ConfigError(f"lora_modules: {m.name!r} is the base model's served name")
        if m.base_model_name not in (None, served_name):
            raise ConfigError(
                f"lora_modules: {m.name!r} names base model {m.base_model_name!r}, but this "
                f"server serves {served_name!r}"
            )
    held = lora.max_cpu_loras
    if held is None:
        room = lora.max_loras if lora.allow_runtime_lora_updating else 0
        held = max(lora.max_loras, len(lora.lora_modules) + room)
    return lora.model_copy(update={"max_cpu_loras": held})
