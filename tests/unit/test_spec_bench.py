"""The speculative decoding experiment's own logic (no server): its code-rewrite
prompts from HumanEval, acceptance from counter deltas, and the report's tables."""

from __future__ import annotations

from benchmarks.experiments import spec_decode
from benchmarks.experiments.trials import Trial, summarize


def test_rewrite_prompts_hold_the_code_the_answer_repeats():
    rows = spec_decode.workload_rows("rewrite")
    plain = spec_decode.workload_rows("plain")
    assert len(rows) == len(plain) == 164
    from benchmarks.harness.datasets import humaneval_problems

    first = humaneval_problems()[0]
    prompt = rows[0]["prompt"]
    assert prompt.startswith((first["prompt"] + first["canonical_solution"]).rstrip())
    name = first["entry_point"]
    assert prompt.rstrip().endswith(
        f"def {name}_v2(numbers: List[float], threshold: float) -> bool:"
    )
    assert plain[0]["prompt"] == first["prompt"]


def test_acceptance_from_counter_deltas():
    before = {"num_drafts": 10.0, "num_draft_tokens": 40.0, "num_accepted_tokens": 5.0,
              'num_accepted_tokens_per_pos{position="0"}': 3.0,
              'num_accepted_tokens_per_pos{position="1"}': 2.0}  # fmt: skip
    after = {"num_drafts": 30.0, "num_draft_tokens": 120.0, "num_accepted_tokens": 35.0,
             'num_accepted_tokens_per_pos{position="0"}': 19.0,
             'num_accepted_tokens_per_pos{position="1"}': 16.0}  # fmt: skip
    a = spec_decode.acceptance(before, after)
    assert a["acceptance_rate"] == 30 / 80
    assert a["mean_acceptance_length"] == 1 + 30 / 20
    assert a["per_position"] == [16 / 20, 14 / 20]
    assert spec_decode.acceptance({}, {}) == {}  # speculation off: nothing to report


def _trial(target: str, config: str, tok_s: float, tpot: float, extra: dict) -> Trial:
    return Trial(
        target=target, config=config, round=0, output_tok_s=tok_s, median_ttft_ms=10.0,
        p99_ttft_ms=20.0, median_tpot_ms=tpot, output_tokens=1000, failed=0,
        frontend_cpu_s=1.0, engine_cpu_s=1.0, client_cpu_s=0.1, extra=extra,
    )  # fmt: skip


def test_report_tables():
    acc = {"drafts": 10.0, "acceptance_rate": 0.5, "mean_acceptance_length": 2.5,
           "per_position": [0.8, 0.6], "server_tpot_ms": 1.5}  # fmt: skip
    trials = [
        _trial("off", "rewrite-1", 400.0, 2.0, {"server_tpot_ms": 3.0}),
        _trial("ngram", "rewrite-1", 600.0, 1.0, acc),
    ]
    meta = {"date": "d", "command": "c", "engine": {}, "rounds": 1, "speculators": {}}
    table = spec_decode.markdown_renderer(trials)(summarize(trials), meta)
    assert "| rewrite | 1 | ngram | 600.0 | 1.50 | 1.00 | 10.0 | 0.50 | 2.50 | 0.80 0.60 |" in table
    assert "| rewrite | 1 | off | 400.0 | 3.00 | 2.00 | 10.0 | – | – | – |" in table
    assert "| rewrite | 1 | ngram | 1.50× | 0.50× |" in table
