"""Our config -> vLLM's engine arguments, for CPU and for A100s (no GPU needed)."""

from __future__ import annotations

import pytest

from engine.config import (
    CODELLAMA_MAX_MODEL_LEN,
    DEMO_MAX_MODEL_LEN,
    REAL_MODEL,
    EngineConfig,
    Settings,
    resolve,
)
from engine.llm import engine_args as _engine_args


def engine_args(cfg: EngineConfig, model_path: str, gpu: bool):
    return _engine_args(resolve(Settings(engine=cfg), gpu=gpu), model_path)


def resolve_model_name(cfg: EngineConfig, gpu: bool) -> str:
    return resolve(Settings(engine=cfg), gpu=gpu).model


def test_default_model_is_13b_on_gpu_and_demo_on_cpu():
    assert resolve_model_name(EngineConfig(), gpu=True) == REAL_MODEL
    assert resolve_model_name(EngineConfig(), gpu=False) == "demo"
    assert resolve_model_name(EngineConfig(model="/models/cl"), gpu=True) == "/models/cl"


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_gpu_args(tp):
    cfg = EngineConfig(
        model=REAL_MODEL, tensor_parallel_size=tp, gpu_memory_utilization=0.85,
        max_num_seqs=128, max_num_batched_tokens=8192, enable_prefix_caching=False,
    )  # fmt: skip
    a = engine_args(cfg, REAL_MODEL, gpu=True)
    assert a.model == REAL_MODEL
    assert a.tensor_parallel_size == tp
    assert a.gpu_memory_utilization == 0.85
    assert a.max_model_len == CODELLAMA_MAX_MODEL_LEN
    assert a.max_num_seqs == 128 and a.max_num_batched_tokens == 8192
    assert a.enable_prefix_caching is False
    assert a.enforce_eager is False  # CUDA graphs on GPUs
    assert a.kv_cache_memory_bytes is None  # sized by gpu_memory_utilization


def test_cpu_args_size_the_kv_cache_in_bytes():
    a = engine_args(EngineConfig(model="demo", cpu_kvcache_space_gib=2), "/cache/demo", gpu=False)
    assert a.model == "/cache/demo"
    assert a.kv_cache_memory_bytes == 2 * (1 << 30)
    assert a.enforce_eager is True
    assert a.max_model_len == DEMO_MAX_MODEL_LEN


def test_explicit_context_window_wins():
    a = engine_args(EngineConfig(model=REAL_MODEL, max_model_len=32768), REAL_MODEL, gpu=True)
    assert a.max_model_len == 32768


def test_vllm_stat_loggers_are_ours_alone():
    a = engine_args(EngineConfig(model=REAL_MODEL), REAL_MODEL, gpu=True)
    assert a.disable_log_stats is True and a.enable_log_requests is False


def test_demo_model_runs_in_float32_unless_told_otherwise():
    # vLLM's "auto" would pick bfloat16 on CPU for a float32 checkpoint.
    assert engine_args(EngineConfig(model="demo"), "/cache/demo", gpu=False).dtype == "float32"
    told = EngineConfig(model="demo", dtype="bfloat16")
    assert engine_args(told, "/cache/demo", gpu=False).dtype == "bfloat16"
    assert engine_args(EngineConfig(model=REAL_MODEL), REAL_MODEL, gpu=True).dtype == "auto"
