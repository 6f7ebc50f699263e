"""`codellama-serve bench …`: run a profile, sweep, compare endpoints, list profiles.

Flags override the profile's YAML; `--set key.path=value` reaches any field.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from benchmarks.harness.client import Target
    from benchmarks.harness.profile.schema import Profile

# Heavy imports (numpy, httpx, pydantic models) wait until a bench command runs:
# `codellama-serve serve` builds this parser too and should not pay for them.

T = TypeVar("T")

EPILOG = """\
examples:
  codellama-serve bench run --base-url http://127.0.0.1:8000            # default.yaml
  codellama-serve bench run poisson --base-url http://127.0.0.1:8000 --rate 8 --duration 30
  codellama-serve bench run --base-url URL --concurrency 16 --num-requests 200 \\
      --dataset synthetic --input-tokens 256 --output-tokens 128 --ignore-eos
  codellama-serve bench sweep --base-url URL --rates 2,4,8,16,32
  codellama-serve bench compare closed-loop --target ours=http://127.0.0.1:8000 \\
      --target vllm=http://127.0.0.1:8001 --trials 3
  codellama-serve bench capacity --base-url URL --slo ttft:p99<=500ms --slo tpot:p90<=50ms
  codellama-serve bench selftest --workers 1,4
  codellama-serve bench profiles
"""


def _csv_floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _add_common(p: argparse.ArgumentParser, *, target: bool = True) -> None:
    p.add_argument("profile", nargs="?", default=None, help="bundled profile name or YAML file")
    if target:
        g = p.add_argument_group("target")
        g.add_argument(
            "--base-url",
            default=os.environ.get("OPENAI_BASE_URL"),
            help="server URL, with or without /v1 [env: OPENAI_BASE_URL]",
        )
        g.add_argument("--model", help="model name (default: the first of GET /v1/models)")
        g.add_argument("--metrics-url", help="Prometheus URL (default: <base>/metrics)")
        g.add_argument("--name", default="", help="a label for the target in reports")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as Authorization: Bearer [env: OPENAI_API_KEY]",
    )
    g = p.add_argument_group("load (override the profile)")
    g.add_argument("--concurrency", type=int, help="closed loop at N in flight (1 = synchronous)")
    g.add_argument("--rate", type=float, help="open loop at R req/s")
    g.add_argument("--arrival", choices=["constant", "poisson", "gamma"])
    g.add_argument("--burstiness", type=float, help="gamma shape (<1 burstier, 1 Poisson)")
    g.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight")
    g.add_argument("--sessions", type=int, help="sessions load (editor): virtual users")
    g.add_argument("--num-requests", type=int)
    g.add_argument("--duration", type=float, help="seconds of load")
    g.add_argument("--rates", type=_csv_floats, help="sweep these rates, e.g. 1,2,4,8")
    g.add_argument("--trace", type=Path, help="replay a JSONL trace")
    g.add_argument("--time-scale", type=float, help="trace: multiply its times")
    g = p.add_argument_group("what is sent")
    g.add_argument(
        "--dataset",
        choices=["humaneval", "infill", "chat", "synthetic", "jsonl", "shared-prefix", "mix"],
        help="(editor and chat-sessions run as `load: {type: sessions}` profiles: "
        "editor.yaml, or --set)",
    )
    g.add_argument("--dataset-path", type=Path, help="jsonl: the file")
    g.add_argument("--input-tokens", type=int, help="synthetic: prompt tokens (fixed)")
    g.add_argument("--output-tokens", type=int, help="max_tokens per request (fixed)")
    g.add_argument("--endpoint", choices=["completions", "chat"])
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--temperature", type=float)
    g.add_argument("--timeout", type=float, help="per-request timeout (s)")
    g.add_argument("--seed", type=int)
    g = p.add_argument_group("measurement")
    g.add_argument("--slo-ttft-ms", type=float)
    g.add_argument("--slo-tpot-ms", type=float)
    g.add_argument("--slo-e2e-ms", type=float)
    g.add_argument("--percentiles", type=_csv_floats, help="e.g. 50,90,99,99.9")
    g.add_argument("--warmup", type=int, help="warm-up requests (not measured)")
    g.add_argument(
        "--server-metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scrape the target's /metrics",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any profile field, e.g. --set load.burstiness=0.5 (value is YAML)",
    )
    g.add_argument(
        "--tokenizer",
        help="HF name or path for synthetic prompts / token check (default: the demo model's)",
    )
    g.add_argument(
        "--token-check",
        choices=["auto", "always", "never"],
        default="auto",
        help="re-tokenize outputs to check usage (auto: when a tokenizer is loaded "
        "or usage is missing)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, help="report directory (default results/bench/<time>)")
    g.add_argument("--save-requests", action="store_true", help="per-request records in the JSON")
    g.add_argument("--save-text", action="store_true", help="…with their generated text")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no log lines, no summary on stdout")
    g.add_argument(
        "--strict",
        action="store_true",
        help="exit 3 if the client fell behind (coordinated omission) or was overloaded",
    )
    g.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    g.add_argument(
        "--loop-lag-interval-ms",
        type=float,
        default=5.0,
        help="period of the client's event-loop lag probe (0: off)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=1,
        help="load-generator processes on this host, each with its own event loop and share "
        "of the schedule (records merged exactly; `bench selftest` measures the headroom)",
    )
    g.add_argument(
        "--client-priority",
        type=int,
        metavar="N",
        help="run the load generator (and its workers) with SCHED_FIFO priority N (1-99; "
        "Linux, root or CAP_SYS_NICE): on a small machine shared with the server, the client "
        "then gets a CPU the moment it has work, as on a machine of its own",
    )
    g.add_argument(
        "--reset-prefix-cache",
        action="store_true",
        default=None,
        help="POST <base>/reset_prefix_cache before the run (vLLM's server in dev mode)",
    )
    g.add_argument(
        "--salt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a unique first line per request so no prompt repeats (default: on, unless the "
        "dataset shares prefixes on purpose)",
    )
    g.add_argument(
        "--http",
        choices=["aiohttp", "httpx"],
        default="aiohttp",
        help="HTTP library (aiohttp costs ~6x less client CPU per streamed chunk)",
    )


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """`bench` and its subcommands, as a subcommand of `codellama-serve`."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmark any OpenAI-compatible endpoint",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_commands(bench)


def main(argv: Sequence[str] | None = None) -> int:
    """The harness on its own (`python -m benchmarks run …`): `codellama-serve bench …`."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_bench_commands(parser)
    return run_bench(parser.parse_args(argv))


def harness_command(*args: str) -> list[str]:
    """The argv of the harness in a process of its own, as any other client."""
    return [sys.executable, "-m", "benchmarks", *args]


def add_bench_commands(bench: argparse.ArgumentParser) -> None:
    """run, sweep, compare, profiles, export-dataset, fake-server."""
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    run = sub.add_parser(
        "run",
        help="run a profile against one endpoint",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(run)
    sweep = sub.add_parser("sweep", help="run rates up to saturation and report the knee")
    _add_common(sweep)
    cmp = sub.add_parser("compare", help="one profile against several endpoints, interleaved")
    _add_common(cmp, target=False)
    cmp.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="NAME=URL",
        help="an endpoint (repeat; the first is the baseline). URL may carry "
        "a model: NAME=URL#model",
    )
    cmp.add_argument("--trials", type=int, default=3, help="rounds of A, B, … (default 3)")
    cap = sub.add_parser(
        "capacity",
        help="the highest rate (or concurrency) at which SLO percentiles hold: "
        "bracketing and bisection, the curve plotted",
    )
    _add_common(cap)
    cap.add_argument(
        "--slo",
        action="append",
        required=True,
        metavar="METRIC:pN<=LIMIT",
        help="an objective, e.g. ttft:p99<=500ms or tpot:p90<=50ms (repeat; all must hold)",
    )
    cap.add_argument(
        "--closed",
        action="store_true",
        help="search a closed loop's concurrency (default: an open loop's rate)",
    )
    cap.add_argument("--start", type=float, help="first load probed (default 4 req/s or 8)")
    cap.add_argument("--min", dest="min_load", type=float, help="lowest load probed")
    cap.add_argument("--max", dest="max_load", type=float, help="highest load probed")
    cap.add_argument(
        "--tolerance", type=float, default=0.05, help="stop when the bracket is this narrow"
    )
    cap.add_argument("--probe-duration", type=float, default=20.0, help="seconds per probe")
    cap.add_argument("--max-probes", type=int, default=16)
    st = sub.add_parser(
        "selftest",
        help="how much load the harness sustains on this host with 1 and N workers "
        "(against its fake server); later runs warn above it",
    )
    st.add_argument("--workers", default="1,4", help="worker counts to measure, e.g. 1,4")
    st.add_argument(
        "--rates",
        type=_csv_floats,
        help="open-loop rates to climb (req/s; default 250,500,1000,…,6000)",
    )
    st.add_argument("--duration", type=float, default=5.0, help="seconds per rate")
    st.add_argument("--max-tokens", type=int, default=8, help="token chunks per request")
    st.add_argument("--fake-processes", type=int, default=2, help="fake-server processes")
    st.add_argument("--out", type=Path, help="report directory (default results/bench/<time>)")
    st.add_argument("--quiet", action="store_true")
    sub.add_parser("profiles", help="list the bundled profiles")
    export = sub.add_parser(
        "export-dataset",
        help="write the requests a profile would send as JSONL (prompt, output_tokens, …), "
        "e.g. to give vLLM's `bench serve --dataset-name custom` the very same prompts",
    )
    _add_common(export, target=False)
    export.add_argument("--output", type=Path, required=True, help="the JSONL file to write")
    export.add_argument("--count", type=int, help="rows (default: the dataset's size)")
    from benchmarks.harness.fake_server import add_arguments as fake_args

    fake = sub.add_parser(
        "fake-server",
        help="a trivial OpenAI-compatible endpoint (for measuring the harness itself)",
    )
    fake_args(fake)


# ---------------------------------------------------------------- profile from flags


# (flag, profile field): each flag given goes to its field, in this order (so --max-tokens
# wins over the max_tokens that --output-tokens sets).
FLAG_FIELDS: tuple[tuple[str, str], ...] = (
    ("arrival", "load.arrival"),
    ("burstiness", "load.burstiness"),
    ("max_concurrency", "load.max_concurrency"),
    ("sessions", "load.sessions"),
    ("time_scale", "load.time_scale"),
    ("num_requests", "num_requests"),
    ("duration", "duration_s"),
    ("dataset", "dataset.type"),
    ("dataset_path", "dataset.path"),
    ("input_tokens", "dataset.input_tokens"),
    ("output_tokens", "dataset.output_tokens"),
    ("output_tokens", "request.max_tokens"),
    ("endpoint", "request.endpoint"),
    ("stream", "request.stream"),
    ("max_tokens", "request.max_tokens"),
    ("ignore_eos", "request.ignore_eos"),
    ("temperature", "request.temperature"),
    ("timeout", "request.timeout_s"),
    ("seed", "seed"),
    ("slo_ttft_ms", "slo.ttft_ms"),
    ("slo_tpot_ms", "slo.tpot_ms"),
    ("slo_e2e_ms", "slo.e2e_ms"),
    ("percentiles", "percentiles"),
    ("warmup", "warmup_requests"),
    ("server_metrics", "server_metrics"),
    ("reset_prefix_cache", "reset_prefix_cache"),
    ("salt", "dataset.salt"),
)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from benchmarks.harness.profile.files import set_dotted

    o: dict[str, Any] = {}
    load = _load_shape(args)
    if load is not None:
        o["load"] = load
    for flag, key in FLAG_FIELDS:
        value = getattr(args, flag)
        if value is not None:
            set_dotted(o, key, str(value) if isinstance(value, Path) else value)
    for kv in args.set:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"--set needs KEY=VALUE, got {kv!r}")
        set_dotted(o, key.strip(), yaml.safe_load(value))
    return o


def _load_shape(args: argparse.Namespace) -> dict[str, Any] | None:
    """The load block a shape flag asks for; of several, the last of these wins."""
    load = None
    if args.concurrency is not None:
        load = {"type": "concurrent", "concurrency": args.concurrency}
    if args.rate is not None:
        load = {"type": "rate", "rate": args.rate}
    if args.rates:
        load = {"type": "sweep", "rates": args.rates}
    if args.trace is not None:
        load = {"type": "trace", "path": str(args.trace)}
    return load


def profile_from_args(args: argparse.Namespace, default: str = "default") -> Profile:
    from benchmarks.harness.profile.files import deep_merge, read_profile_dict
    from benchmarks.harness.profile.schema import Profile

    name = args.profile or default
    data, _ = read_profile_dict(name)
    over = overrides_from_args(args)
    # Flags that change the load shape drop the profile's count/duration bounds
    # only when they conflict with the new shape.
    if over.get("load", {}).get("type") in ("sweep", "trace"):
        data.pop("num_requests", None)
        data.pop("duration_s", None)
    if "description" not in over and any(k in over for k in ("load", "num_requests", "duration_s")):
        # The profile's prose describes its own load, not the one the flags set: the
        # report prints the effective load instead (finding 9 of issue 12).
        data["description"] = f"Profile `{name}` with its load set by flags."
    return Profile.model_validate(deep_merge(data, over))


# ---------------------------------------------------------------- running


def _run_async(coro: Coroutine[Any, Any, T], loop: str) -> T:
    factory = None
    if loop in ("auto", "uvloop"):
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            if loop == "uvloop":
                raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def _out_dir(args: argparse.Namespace, kind: str) -> Path:
    if args.out:
        return Path(args.out)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / "bench" / f"{stamp}-{kind}"


def _log(args: argparse.Namespace) -> Callable[[str], None]:
    if args.quiet:
        return lambda _m: None
    return lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _progress(args: argparse.Namespace) -> bool:
    return not (args.no_progress or args.quiet) and sys.stderr.isatty()


def _parse_target(spec: str, api_key: str | None) -> Target:
    from benchmarks.harness.client import Target

    name, sep, url = spec.partition("=")
    if not sep:
        name, url = "", spec
    url, _, model = url.partition("#")
    return Target(url, api_key=api_key, model=model or None, name=name)


def run_bench(args: argparse.Namespace) -> int:
    cmd = args.bench_command
    without_profile = {
        "profiles": _list_profiles,
        "fake-server": _fake_server,
        "selftest": _selftest,
    }
    if cmd in without_profile:
        return without_profile[cmd](args)
    if cmd == "export-dataset":
        return _export(args)
    log = _log(args)
    profile = _profile_or_none(args, default="sweep" if cmd == "sweep" else "default")
    if profile is None or not _set_priority(args.client_priority):
        return 2
    from benchmarks.harness.workers import workers_refused

    if refused := workers_refused(profile.load, args.workers):
        print(f"codellama-serve bench: {refused}", file=sys.stderr)
        return 2
    runner_kwargs = {
        "progress": _progress(args),
        "tokenizer": args.tokenizer,
        "token_check": args.token_check,
        "http": args.http,
        "loop_lag_interval_s": args.loop_lag_interval_ms / 1000,
        "workers": args.workers,
    }
    if cmd == "compare":
        return _compare(args, profile, runner_kwargs, log)
    if cmd == "capacity":
        return _capacity(args, profile, runner_kwargs, log)
    return _run(args, profile, runner_kwargs, log)


def _set_priority(priority: int | None) -> bool:
    """SCHED_FIFO at `priority` for this process (threads and workers started later inherit
    it); False (and why, on stderr) if the system refuses."""
    if priority is None:
        return True
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    except (OSError, AttributeError) as e:
        print(f"codellama-serve bench: --client-priority {priority}: {e}", file=sys.stderr)
        return False
    return True


def _profile_or_none(args: argparse.Namespace, default: str = "default") -> Profile | None:
    """The profile the flags ask for, or None (and the reason on stderr)."""
    from pydantic import ValidationError

    try:
        return profile_from_args(args, default=default)
    except (ValidationError, ValueError, FileNotFoundError) as e:
        print(f"codellama-serve bench: invalid profile: {e}", file=sys.stderr)
        return None


def _list_profiles(args: argparse.Namespace) -> int:
    import yaml

    from benchmarks.harness.profile.files import bundled_profiles

    for name, path in bundled_profiles().items():
        desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        print(f"{name:14} {' '.join(str(desc).split())[:100]}")
    return 0


def _fake_server(args: argparse.Namespace) -> int:
    from benchmarks.harness.fake_server import serve

    return serve(args)


def _target(args: argparse.Namespace) -> Target | None:
    """The endpoint the flags name, or None (said on stderr) without --base-url."""
    from benchmarks.harness.client import Target

    if not args.base_url:
        print("codellama-serve bench: --base-url is required (or OPENAI_BASE_URL)", file=sys.stderr)
        return None
    return Target(args.base_url, api_key=args.api_key, model=args.model,
                  metrics_url=args.metrics_url, name=args.name)  # fmt: skip


def _run(
    args: argparse.Namespace,
    profile: Profile,
    runner_kwargs: dict[str, Any],
    log: Callable[[str], None],
) -> int:
    from benchmarks.harness.report.as_markdown import run_markdown
    from benchmarks.harness.report.write import write_run_report
    from benchmarks.harness.results import WarmupFailed
    from benchmarks.harness.runner import Runner

    target = _target(args)
    if target is None:
        return 2
    try:
        result = _run_async(Runner(profile, target, log=log, **runner_kwargs).run(), args.loop)
    except WarmupFailed as e:
        print(f"codellama-serve bench: {e}", file=sys.stderr)
        return 2
    except _run_errors() as e:
        print(f"codellama-serve bench: {target.api}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    out = _out_dir(args, profile.name)
    paths = write_run_report(
        result,
        out,
        with_requests=args.save_requests or args.save_text,
        with_text=args.save_text,
        command=sys.argv,
        plots=not args.no_plots,
    )
    _show(args, run_markdown(result), paths)
    return _exit_code(args, [result])


def _compare(
    args: argparse.Namespace,
    profile: Profile,
    runner_kwargs: dict[str, Any],
    log: Callable[[str], None],
) -> int:
    from benchmarks.harness.compare import compare, comparison_markdown, write_comparison
    from benchmarks.harness.results import WarmupFailed

    targets = [_parse_target(t, args.api_key) for t in args.target]
    try:
        cmp = _run_async(
            compare(profile, targets, args.trials, runner_kwargs=runner_kwargs, log=log), args.loop
        )
    except _run_errors(WarmupFailed, ValueError) as e:
        print(f"codellama-serve bench: {e}", file=sys.stderr)
        return 2
    out = _out_dir(args, f"compare-{profile.name}")
    paths = write_comparison(cmp, out, command=sys.argv, with_requests=args.save_requests)
    _show(args, comparison_markdown(cmp), paths)
    return _exit_code(args, [r for runs in cmp.results.values() for r in runs])


def _capacity(
    args: argparse.Namespace,
    profile: Profile,
    runner_kwargs: dict[str, Any],
    log: Callable[[str], None],
) -> int:
    from benchmarks.harness.capacity import Objective, Search, capacity_summary, judge
    from benchmarks.harness.capacity import probe_profile as at_load
    from benchmarks.harness.report.capacity import capacity_markdown, write_capacity
    from benchmarks.harness.results import WarmupFailed
    from benchmarks.harness.runner import Runner

    target = _target(args)
    if target is None:
        return 2
    try:
        objectives = [Objective.parse(s) for s in args.slo]
    except ValueError as e:
        print(f"codellama-serve bench: {e}", file=sys.stderr)
        return 2
    closed = args.closed

    async def run(load: float) -> Any:
        p = at_load(profile, load, closed, args.probe_duration, objectives)
        probe = judge(load, await Runner(p, target, log=log, **runner_kwargs).run(), objectives)
        log(f"capacity probe {load:g}: {'meets' if probe.meets else 'misses'} ({probe.reason})")
        return probe

    search = Search(
        run,
        start=args.start or (8 if closed else 4),
        low=args.min_load or (1 if closed else 0.25),
        high=args.max_load or (1024 if closed else 4096),
        tolerance=args.tolerance,
        max_probes=args.max_probes,
        integer=closed,
    )
    try:
        capacity = _run_async(search.find(), args.loop)
    except _run_errors(WarmupFailed) as e:
        print(f"codellama-serve bench: {target.api}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    data = capacity_summary(search, capacity, objectives, closed)
    data["command"] = sys.argv
    title = f"{profile.name} · {target.label}"
    paths = write_capacity(data, _out_dir(args, f"capacity-{profile.name}"), title)
    _show(args, capacity_markdown(data, title), paths)
    return 0 if capacity is not None else 1


def _show(args: argparse.Namespace, markdown: str, paths: Mapping[str, Path]) -> None:
    """The report's tables on stdout and where it was written on stderr (unless --quiet)."""
    if not args.quiet:
        print(markdown)
        print(f"report: {paths['json']}  {paths['markdown']}", file=sys.stderr)


def _selftest(args: argparse.Namespace) -> int:
    from benchmarks.harness import selftest as st

    workers = [int(w) for w in str(args.workers).split(",") if w.strip()]
    out = _out_dir(args, "selftest")
    port = st.free_port()
    procs = st.start_fake_servers(port, args.fake_processes, out)
    try:
        data = _run_async(
            st.selftest(
                f"http://127.0.0.1:{port}", workers, args.rates or st.DEFAULT_RATES,
                args.duration, args.max_tokens, _log(args),
            ),
            "auto",
        )  # fmt: skip
    finally:
        st.stop(procs)
    path = st.save(data, out)
    if not args.quiet:
        print(st.selftest_markdown(data))
        print(f"report: {out / 'selftest.md'} · headroom kept in {path}", file=sys.stderr)
    return 0


def _run_errors(*more: type[BaseException]) -> tuple[type[BaseException], ...]:
    """What a run that cannot reach or use its target raises (a request's failure does not)."""
    import aiohttp
    import httpx

    return (*more, OSError, RuntimeError, httpx.HTTPError, aiohttp.ClientError)


def _export(args: argparse.Namespace) -> int:
    import itertools
    import json

    from benchmarks.harness.datasets import build_items, cycle, load_tokenizer

    profile = _profile_or_none(args)
    if profile is None:
        return 2
    try:
        items = build_items(profile.dataset, profile.seed, lambda: load_tokenizer(args.tokenizer))
    except ValueError as e:  # e.g. editor sessions: made while they run
        print(f"codellama-serve bench export-dataset: {e}", file=sys.stderr)
        return 2
    count = args.count or len(items)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as f:
        for it in itertools.islice(cycle(items), count):
            row: dict[str, Any] = {"id": it.id}
            if it.messages is not None:
                row["messages"] = list(it.messages)
            else:
                row["prompt"] = it.prompt
            if it.suffix is not None:
                row["suffix"] = it.suffix
            out = it.max_tokens if it.max_tokens is not None else profile.request.max_tokens
            if out is not None:
                row["output_tokens"] = out
            if it.input_tokens is not None:
                row["input_tokens"] = it.input_tokens
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{count} requests → {args.output}", file=sys.stderr)
    return 0


def _exit_code(args: argparse.Namespace, results: list[Any]) -> int:
    if any(r.summary["completed"] == 0 for r in results):
        return 1
    if args.strict and any(
        r.client["loop_lag"].get("overloaded")
        or any(st.summary["load"].get("coordinated_omission") for st in r.steps)
        for r in results
    ):
        return 3
    return 0
