"""Settings: flags beat env vars beat the YAML file beat defaults; errors name the flag."""

from __future__ import annotations

import pytest

from engine.cli import build_parser, settings_from_args
from engine.config import ConfigError, build_settings, sections


def test_defaults():
    s = build_settings(env={})
    assert s.engine.model is None and s.engine.tensor_parallel_size == 1
    assert s.server.host == "127.0.0.1" and s.server.port == 8000


def test_precedence_flag_env_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("engine:\n  max_num_seqs: 8\n  max_model_len: 1024\nserver:\n  port: 9000\n")
    env = {"CODELLAMA_SERVE_MAX_NUM_SEQS": "16", "CODELLAMA_SERVE_ENABLE_PREFIX_CACHING": "false"}
    args = build_parser().parse_args(["serve", "--config", str(cfg), "--max-num-seqs", "32"])
    import os

    old = dict(os.environ)
    os.environ.update(env)
    try:
        s = settings_from_args(args)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert s.engine.max_num_seqs == 32  # flag
    assert s.engine.enable_prefix_caching is False  # env
    assert s.engine.max_model_len == 1024  # file
    assert s.server.port == 9000  # file


def test_vllm_flag_names():
    args = build_parser().parse_args(
        ["serve", "--tensor-parallel-size", "4", "--max-model-len", "16384",
         "--gpu-memory-utilization", "0.85", "--no-enable-chunked-prefill"]
    )  # fmt: skip
    s = settings_from_args(args)
    assert s.engine.tensor_parallel_size == 4
    assert s.engine.max_model_len == 16384
    assert s.engine.gpu_memory_utilization == 0.85
    assert s.engine.enable_chunked_prefill is False


@pytest.mark.parametrize(
    ("env", "flag"),
    [
        ({"CODELLAMA_SERVE_TENSOR_PARALLEL_SIZE": "0"}, "--tensor-parallel-size"),
        ({"CODELLAMA_SERVE_GPU_MEMORY_UTILIZATION": "1.5"}, "--gpu-memory-utilization"),
        ({"CODELLAMA_SERVE_DTYPE": "int3"}, "--dtype"),
    ],
)
def test_invalid_values_name_the_flag_and_env_var(env, flag):
    with pytest.raises(ConfigError) as e:
        build_settings(env=env)
    assert flag in str(e.value)
    assert next(iter(env)) in str(e.value)


def test_unknown_file_keys_are_errors():
    with pytest.raises(ConfigError, match="unknown config sections"):
        build_settings(file_values={"engnie": {}}, env={})
    with pytest.raises(ConfigError, match=r"engine\.max_num_seq: unknown setting"):
        build_settings(file_values={"engine": {"max_num_seq": 3}}, env={})


def test_every_setting_has_a_flag_and_help():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    help_text = serve.format_help()
    for model in sections().values():
        for name, info in model.model_fields.items():
            assert "--" + name.replace("_", "-") in help_text
            assert info.description, f"{name} has no description for --help"


def test_resolution_works_out_every_default_in_one_place():
    from engine.config import (
        DEMO_MAX_MODEL_LEN,
        DEMO_MODEL_NAME,
        RAY_STREAM_COALESCE_MS,
        REAL_MODEL,
        resolve,
    )

    s = build_settings(env={})
    cpu = resolve(s, gpu=False)
    assert (cpu.model, cpu.served_model_name, cpu.is_demo) == ("demo", DEMO_MODEL_NAME, True)
    assert cpu.engine.max_model_len == DEMO_MAX_MODEL_LEN and cpu.engine.dtype == "float32"
    assert cpu.engine.enforce_eager is True and cpu.engine.distributed_executor_backend is None
    assert cpu.stream_coalesce_s == 0.0
    assert cpu.max_admitted_sequences == 256 + 256
    gpu = resolve(s, gpu=True, mode="ray")
    assert gpu.model == REAL_MODEL and gpu.engine.dtype == "auto"
    assert gpu.engine.distributed_executor_backend == "ray"
    # Frames are coalesced where each write is a message between actors: behind Ray's
    # Python proxy; behind HAProxy (the default ingress) they are socket writes.
    assert gpu.routing.ray_ingress == "haproxy" and gpu.server.stream_coalesce_ms == 0.0
    proxy = build_settings(env={}, file_values={"routing": {"ray_ingress": "proxy"}})
    assert resolve(proxy, gpu=True, mode="ray").server.stream_coalesce_ms == RAY_STREAM_COALESCE_MS
    assert resolve(s, gpu=False, mode="ray").engine.distributed_executor_backend == "mp"
    # Pure and idempotent: resolving again changes nothing; what was set wins.
    assert resolve(cpu.settings, gpu=False) == cpu
    told = build_settings(env={}, overrides={"stream_coalesce_ms": 5, "max_model_len": 512})
    assert resolve(told, gpu=False, mode="ray").server.stream_coalesce_ms == 5
    assert resolve(told, gpu=False).engine.max_model_len == 512
