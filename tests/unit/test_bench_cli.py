"""`codellama-serve bench …`: flags over profiles, and a whole run against a fake server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.cli import profile_from_args
from benchmarks.harness.fake_server import FakeOpenAI, FakeServerThread
from engine.cli import build_parser, main


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["bench", *argv])


def test_bench_is_wired_into_the_main_cli() -> None:
    args = parse("run", "--base-url", "http://x")
    assert args.command == "bench" and args.bench_command == "run"
    p = profile_from_args(args)
    assert p.name == "default" and p.load.type == "rate"


def test_flags_override_the_profile() -> None:
    p = profile_from_args(parse("run", "poisson", "--concurrency", "4", "--num-requests", "9"))
    assert p.load.type == "concurrent" and p.load.concurrency == 4 and p.num_requests == 9
    p = profile_from_args(
        parse(
            "run",
            "--rate",
            "3",
            "--arrival",
            "gamma",
            "--set",
            "load.burstiness=0.5",
            "--dataset",
            "synthetic",
            "--input-tokens",
            "100",
            "--output-tokens",
            "20",
            "--ignore-eos",
            "--no-stream",
            "--slo-ttft-ms",
            "200",
            "--percentiles",
            "50,99.9",
        )
    )
    assert (p.load.rate, p.load.arrival, p.load.burstiness) == (3, "gamma", 0.5)
    assert p.dataset.input_tokens.mean == 100 and p.dataset.output_tokens.mean == 20
    assert p.request.max_tokens == 20 and p.request.ignore_eos and not p.request.stream
    assert p.slo.ttft_ms == 200 and p.percentiles == [50, 99.9]
    p = profile_from_args(parse("sweep", "--rates", "1,2,4"), default="sweep")
    assert p.load.type == "sweep" and p.load.rates == [1, 2, 4]


def test_bad_flags_exit_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["bench", "run", "--base-url", "http://x", "--concurrency", "2", "--arrival", "gamma"])
        == 2
    )
    assert "invalid profile" in capsys.readouterr().err
    assert main(["bench", "run", "no-such-profile", "--base-url", "http://x"]) == 2
    assert (
        main(["bench", "run", "--base-url", "http://127.0.0.1:9/", "--no-progress", "--quiet"]) == 2
    )


def test_profiles_are_listed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "profiles"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "sweep" in out and "trace" in out


def test_a_whole_run_writes_its_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServerThread(FakeOpenAI()) as srv:
        code = main(
            [
                "bench",
                "run",
                "chat",
                "--base-url",
                srv.base_url + "/v1",
                "--concurrency",
                "2",
                "--num-requests",
                "6",
                "--out",
                str(tmp_path),
                "--no-progress",
                "--save-requests",
            ]
        )
    assert code == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["completed"] == 6 and data["backend"] == "openai-chat"
    assert len(data["requests"]) == 6
    assert (tmp_path / "report.md").is_file() and (tmp_path / "latency_cdf.png").is_file()
    assert "| TTFT |" in capsys.readouterr().out


def test_compare_from_the_cli(tmp_path: Path) -> None:
    with FakeServerThread(FakeOpenAI()) as a, FakeServerThread(FakeOpenAI()) as b:
        code = main(
            [
                "bench",
                "compare",
                "synchronous",
                "--target",
                f"a={a.base_url}",
                "--target",
                f"b={b.base_url}#fake-model",
                "--trials",
                "1",
                "--num-requests",
                "3",
                "--out",
                str(tmp_path),
                "--quiet",
                "--no-plots",
            ]
        )
    assert code == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["order"] == ["a", "b"] and data["baseline"] == "a"
