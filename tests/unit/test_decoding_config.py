"""--speculative-config / --structured-outputs-config: parsing, start-up errors,
vLLM's engine arguments, and the speculative decoding counters (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.cli import build_parser, settings_from_args
from engine.config import ConfigError, build_settings, resolve
from engine.llm import EngineSetupError, EngineStats, check_setup, engine_args
from engine.metrics import EngineGauges, Metrics

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}'


def settings_from_flags(*flags: str):
    return settings_from_args(build_parser().parse_args(["serve", *flags]))


def test_speculative_config_from_flag_env_and_file():
    flag = settings_from_flags("--speculative-config", NGRAM).decoding.speculative_config
    assert flag is not None and flag.method == "ngram"
    assert (flag.num_speculative_tokens, flag.prompt_lookup_max) == (4, 4)
    env = build_settings(env={"CODELLAMA_SERVE_SPECULATIVE_CONFIG": '{"method": "suffix"}'})
    assert env.decoding.speculative_config is not None
    assert env.decoding.speculative_config.method == "suffix"
    file = build_settings(
        file_values={"decoding": {"speculative_config": {"method": "ngram",
                                                         "num_speculative_tokens": 2}}},
        env={},
    )  # fmt: skip
    assert file.decoding.speculative_config is not None
    assert file.decoding.speculative_config.num_speculative_tokens == 2
    assert build_settings(env={}).decoding.speculative_config is None  # off by default


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('{"method": "eagle", "model": "yuhuili/EAGLE-llama2-chat-7B"}', "method 'eagle'"),
        ('{"method": "draft_model", "model": "x"}', "no second model"),
        ('{"method": "ngram", "model": "x", "num_speculative_tokens": 2}', "without 'model'"),
        ('{"num_speculative_tokens": 2}', "method None"),
        ('{"method": "ngram"}', "num_speculative_tokens: Field required"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "greater than or equal to 1"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, '
         '"prompt_lookup_max": 3}', "prompt_lookup_min (5) > prompt_lookup_max (3)"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}',
         "lookahead: unknown key"),
        ('{"method": "suffix", "suffix_decoding_min_token_prob": 2}', "less than or equal to 1"),
        ('{"method": ', "not valid JSON"),
        ("[1, 2]", "valid dictionary"),
    ],
)  # fmt: skip
def test_bad_speculative_config_is_a_clear_start_up_error(value, fragment):
    with pytest.raises(ConfigError) as e:
        settings_from_flags("--speculative-config", value)
    assert "--speculative-config (CODELLAMA_SERVE_SPECULATIVE_CONFIG)" in str(e.value)
    assert fragment in str(e.value)


def test_bad_structured_outputs_config_is_a_clear_start_up_error():
    with pytest.raises(ConfigError, match="disable_any_whitespace needs backend"):
        settings_from_flags(
            "--structured-outputs-config", '{"backend": "outlines", "disable_any_whitespace": true}'
        )
    with pytest.raises(ConfigError, match="Input should be 'auto'"):
        settings_from_flags("--structured-outputs-config", '{"backend": "regex-magic"}')


def test_engine_args_carry_vllm_json():
    settings = settings_from_flags(
        "--speculative-config", NGRAM,
        "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}',
    )  # fmt: skip
    args = engine_args(resolve(settings, gpu=False), "/cache/demo")
    assert args.speculative_config == {
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
    }  # fmt: skip
    assert args.structured_outputs_config.backend == "xgrammar"
    assert args.structured_outputs_config.disable_any_whitespace is True
    plain = engine_args(resolve(build_settings(env={}), gpu=False), "/cache/demo")
    assert plain.speculative_config is None
    assert plain.structured_outputs_config.backend == "auto"  # vLLM's own default


def test_suffix_without_arctic_inference_fails_before_loading(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "arctic_inference" else real(n, *a)
    )
    suffix = resolve(settings_from_flags("--speculative-config", '{"method": "suffix"}'), gpu=False)
    with pytest.raises(EngineSetupError, match="arctic-inference"):
        check_setup(suffix)
    check_setup(resolve(settings_from_flags("--speculative-config", NGRAM), gpu=False))


def _step(drafts, draft_tokens, accepted, per_pos):
    # The fields of vLLM's SpecDecodingStats that the stats logger reads.
    return SimpleNamespace(
        num_drafts=drafts, num_draft_tokens=draft_tokens, num_accepted_tokens=accepted,
        num_accepted_tokens_per_pos=per_pos,
    )  # fmt: skip


def test_spec_decode_totals_add_up_steps():
    stats = EngineStats()
    stats.add_spec_decode(None)  # a step without speculation
    assert stats.spec_decode is None
    stats.add_spec_decode(_step(2, 6, 4, [2, 1, 1]))
    stats.add_spec_decode(_step(1, 3, 1, [1, 0, 0]))
    totals = stats.spec_decode
    assert totals is not None
    assert (totals.drafts, totals.draft_tokens, totals.accepted_tokens) == (3, 9, 5)
    assert totals.accepted_per_position == [3, 1, 1]


def _metrics(stats: EngineStats) -> str:
    zero = lambda: 0.0  # noqa: E731
    gauges = EngineGauges(
        running=zero, waiting=zero, kv_cache_usage=zero, healthy=zero, ready=zero,
        spec_decode=lambda: stats.spec_decode,
    )  # fmt: skip
    body, _ = Metrics(gauges, model_name=lambda: "m").render()
    return body.decode()


def test_spec_decode_counters_are_exported_when_on():
    stats = EngineStats()
    assert "spec_decode" not in _metrics(stats)  # off: no series at all
    stats.add_spec_decode(_step(4, 12, 7, [4, 2, 1]))
    text = _metrics(stats)
    assert "codellama_serve_spec_decode_num_drafts_total 4.0" in text
    assert "codellama_serve_spec_decode_num_draft_tokens_total 12.0" in text
    assert "codellama_serve_spec_decode_num_accepted_tokens_total 7.0" in text
    per_pos = "codellama_serve_spec_decode_num_accepted_tokens_per_pos_total"
    for position, value in enumerate([4, 2, 1]):
        assert f'{per_pos}{{position="{position}"}} {value:.1f}' in text
    assert "# TYPE codellama_serve_spec_decode_num_drafts_total counter" in text
