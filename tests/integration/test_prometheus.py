"""The dashboard and the alerts, evaluated by a real Prometheus scraping a real server.

A Prometheus process of the test's own (Debian's `prometheus`, installed by `make setup`;
temp config and data, a free port, 1 s scrapes, the shipped alerts.yaml loaded) scrapes a
server of its own (a small queue and a 2 s request timeout, so the load produces every
kind of outcome: 200s, streams, client disconnects, a 504 timeout, 429 refusals). After a
warm-up that creates every labelled series, the test snapshots /metrics, runs the load,
snapshots again, then asks Prometheus every query of every dashboard panel (rows
included) and every value an alert compares, over a window spanning the load:

- each returns series;
- the snapshots' differences match what the load did (requests by endpoint and status,
  tokens, aborts, refusals, TTFT observations);
- Prometheus's answer equals the same query evaluated on the snapshots
  (tests/prom_reference.py): rates, ratios, quantiles and gauges alike;
- TTFT quantiles lie within what the clients measured;
- every alert rule evaluates without error and none fires.

Queries come from the files, so panels and alerts added later are evaluated too.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, ServerProcess, free_port, serving
from tests.prom_reference import Reference, Unsupported, agrees, operands, parse_metrics

pytestmark = pytest.mark.timeout(600)

OBS = ROOT / "deploy" / "observability"
DASHBOARD = OBS / "grafana" / "dashboards" / "codellama-serve.json"
ALERTS = OBS / "prometheus" / "alerts.yaml"
JOB = "codellama-serve"
BATCH, WAITING = 4, 4  # the server's queue bound: 8 sequences
MODEL = "codellama-serve-demo"


# ---------------------------------------------------------------- Prometheus


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: Any) -> Any:
        r = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, r.text)
        return body["data"]

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        data = self.api("query", query=expr, time=f"{at:.3f}")
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def last_scrape(self) -> float:
        """Time of the latest sample scraped from the server (0 before the first)."""
        result = self.api("query", query=f'timestamp(up{{job="{JOB}"}})')["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for_scrape_after(self, t: float, timeout: float = 20) -> float:
        deadline = time.monotonic() + timeout
        while (scraped := self.last_scrape()) <= t:
            assert time.monotonic() < deadline, self.log_path.read_text()[-3000:]
            time.sleep(0.2)
        return scraped


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    assert found, "no `prometheus` on PATH: `make setup` installs Debian's package"
    return found


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory) -> Iterator[ServerProcess]:
    with serving(
        tmp_path_factory.mktemp("prom-server"),
        "--max-num-seqs", str(BATCH), "--max-waiting-requests", str(WAITING),
        "--request-timeout-s", "2",
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def prometheus(prometheus_binary, metrics_server, tmp_path_factory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{metrics_server.port}"]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                prometheus_binary, f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    prom = Prometheus(proc, port, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(prom.url + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- the load


@dataclass
class Outcomes:
    """What the clients saw, by (endpoint, status)."""

    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    prompt_tokens: int = 0  # of 200s
    completion_tokens: int = 0  # of 200s
    ttfts: list[float] = field(default_factory=list)  # client-side, of 200s

    def ok(self, endpoint: str, usage: dict[str, int], ttft: float) -> None:
        self.statuses[endpoint, "200"] += 1
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.ttfts.append(ttft)


PLAIN = {"prompt": "def add(a, b):", "max_tokens": 24, "ignore_eos": True}
CHAT = {
    "messages": [{"role": "user", "content": "Sort a list."}], "max_tokens": 24,
    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
}  # fmt: skip


async def _plain(c: httpx.AsyncClient, out: Outcomes) -> None:
    started = time.monotonic()
    r = await c.post("/v1/completions", json=PLAIN)
    if r.status_code == 200:
        # Not streamed: the first token reached the client with the body at the latest.
        out.ok("completions", r.json()["usage"], time.monotonic() - started)
    else:
        out.statuses["completions", str(r.status_code)] += 1


async def _chat(c: httpx.AsyncClient, out: Outcomes) -> None:
    started, ttft, usage = time.monotonic(), None, None
    async with c.stream("POST", "/v1/chat/completions", json=CHAT) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif ttft is None and any(ch["delta"].get("content") for ch in chunk["choices"]):
                ttft = time.monotonic() - started
    assert usage is not None and ttft is not None
    out.ok("chat", usage, ttft)


async def _disconnect(c: httpx.AsyncClient, out: Outcomes) -> None:
    body = {**PLAIN, "max_tokens": 1000, "stream": True}
    async with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        n = 0
        async for _ in r.aiter_lines():
            n += 1
            if n >= 6:
                break  # leaving closes the connection: the server answers 499 and aborts
    out.statuses["completions", "499"] += 1


async def _timeout(c: httpx.AsyncClient, out: Outcomes) -> None:
    body = {"prompt": "x", "max_tokens": 1900, "ignore_eos": True}  # longer than the 2 s timeout
    r = await c.post("/v1/completions", json=body)
    assert r.status_code == 504, r.text
    out.statuses["completions", "504"] += 1


async def _burst(c: httpx.AsyncClient, out: Outcomes, size: int) -> None:
    await asyncio.gather(*(_plain(c, out) for _ in range(size)))


async def run_load(base_url: str, scale: int) -> Outcomes:
    """Every outcome at least once; `scale` repeats the plain and chat requests."""
    out = Outcomes()
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as c:

        async def worker(kind: Any, n: int) -> None:
            for _ in range(n):
                await kind(c, out)

        await asyncio.gather(
            worker(_plain, 3 * scale), worker(_plain, 3 * scale), worker(_chat, 2 * scale),
            worker(_disconnect, scale), _timeout(c, out),
        )  # fmt: skip
        # With the engine idle, a burst of 3x the bound: exactly the bound is admitted.
        await _burst(c, out, 3 * (BATCH + WAITING))
    return out


def wait_idle(srv: ServerProcess, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while srv.metric("codellama_serve_requests_running") or srv.metric(
        "codellama_serve_http_requests_in_flight"
    ):
        assert time.monotonic() < deadline, "the server did not become idle"
        time.sleep(0.1)


# ---------------------------------------------------------------- the queries


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) for every target of every panel, rows' panels included."""
    return [
        (f"panel {panel['title']!r} {target.get('refId', '?')}", target["expr"])
        for panel in _panels(dashboard()["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def grafana_variables(prom: Prometheus) -> dict[str, str]:
    """Each query variable as Grafana's default selection ("All") sets it; checks that each
    variable's query finds series."""
    values: dict[str, str] = {}
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert m, f"variable {var['name']}: unexpected query {query!r}"
        selector = _substitute(m.group(1), values, window_ms=60_000)
        series = prom.api("series", **{"match[]": selector})
        assert series, f"variable {var['name']}: {selector} matches no series"
        found = sorted({s[m.group(2)] for s in series if m.group(2) in s})
        values[var["name"]] = var.get("allValue") or "|".join(found) or ".*"
    return values


def _substitute(expr: str, variables: dict[str, str], window_ms: int) -> str:
    for name, value in variables.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    for macro in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(macro, f"{window_ms}ms")
    return expr


def _alert_window(expr: str, window_ms: int) -> str:
    # The alerts' own ranges (5m, 10m) reach back before the load; promtool's unit tests
    # cover them. Here their values are checked over the load's window.
    return re.sub(r"\[\d+[smhd]\]", f"[{window_ms}ms]", expr)


def _labels(series: dict[str, Any]) -> frozenset[tuple[str, str]]:
    return frozenset((k, v) for k, v in series["metric"].items() if k != "__name__")


def check_query(prom: Prometheus, reference: Reference, where: str, expr: str, at: float) -> str:
    """Ask Prometheus; compare with the reference evaluation. Returns a report line."""
    result = prom.query(expr, at)
    assert result, f"{where}: {expr} returned no series"
    got = {_labels(s): float(s["value"][1]) for s in result}
    try:
        want = reference.evaluate(expr)
    except Unsupported as e:
        return f"{where}: {len(got)} series (values not predictable: {e})"
    assert isinstance(want, dict), (where, want)
    assert set(got) == set(want), f"{where}: labels {sorted(got)} != expected {sorted(want)}"
    for labels, value in got.items():
        assert agrees(value, want[labels]), (
            f"{where}: {dict(labels)} = {value}, expected {want[labels]} ({expr})"
        )
    shown = ", ".join(f"{v:.4g}" for v in list(got.values())[:4])
    return f"{where}: {len(got)} series = {shown} (matches the snapshots)"


# ---------------------------------------------------------------- the test


SERVER_SERIES = re.compile(r"^codellama_serve_")


def _series_sum(snapshot: dict, name: str, **labels: str) -> float:
    return sum(
        v for k, v in snapshot.items()
        if dict(k)["__name__"] == name and all(dict(k).get(a) == b for a, b in labels.items())
    )  # fmt: skip


def _delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return _series_sum(after, name, **labels) - _series_sum(before, name, **labels)


def _check_against_the_load(before: dict, after: dict, out: Outcomes) -> None:
    """The server's own counters moved exactly as the clients saw."""
    for (endpoint, status), n in out.statuses.items():
        got = _delta(before, after, "codellama_serve_requests_total", endpoint=endpoint,
                     status=status)  # fmt: skip
        assert got == n, f"requests_total{{{endpoint},{status}}} moved by {got}, clients saw {n}"
    total = _delta(before, after, "codellama_serve_requests_total")
    assert total == sum(out.statuses.values())
    assert _delta(before, after, "codellama_serve_generation_tokens_total") == out.completion_tokens
    assert _delta(before, after, "codellama_serve_prompt_tokens_total") == out.prompt_tokens
    refused = out.statuses["completions", "429"]
    assert refused >= 2 * (BATCH + WAITING)
    assert _delta(before, after, "codellama_serve_requests_refused_total", reason="queue_full") == (
        refused
    )
    aborted = "codellama_serve_requests_aborted_total"
    assert (
        _delta(before, after, aborted, reason="client_disconnect")
        == out.statuses["completions", "499"]
    )
    assert _delta(before, after, aborted, reason="timeout") == out.statuses["completions", "504"]
    ok = sum(n for (_, status), n in out.statuses.items() if status == "200")
    ttft_count = "codellama_serve_time_to_first_token_seconds_count"
    assert _delta(before, after, ttft_count) == ok


def _check_ttft_quantiles(prom: Prometheus, queries: list, variables: dict, window: int,
                          at: float, out: Outcomes) -> int:  # fmt: skip
    """TTFT quantiles within (0, the upper bound of the bucket holding the slowest client
    TTFT]: the server's TTFT is at most what the client measured."""
    from engine.metrics import TTFT_BUCKETS

    slowest = max(out.ttfts)
    bound = next((b for b in TTFT_BUCKETS if b >= slowest), math.inf)
    checked = 0
    for where, expr in queries:
        if "time_to_first_token_seconds_bucket" not in expr or "histogram_quantile" not in expr:
            continue
        for s in prom.query(_substitute(expr, variables, window), at):
            value = float(s["value"][1])
            if math.isnan(value) and s["metric"].get("priority_class", "default") != "default":
                continue  # a priority class this load never used: no quantile to take
            assert 0 < value <= bound, f"{where}: {value} s not in (0, {bound}] ({slowest=})"
            checked += 1
    return checked


async def test_dashboard_and_alert_queries_match_the_load(metrics_server, prometheus) -> None:
    srv, prom = metrics_server, prometheus
    target = {"job": JOB, "instance": f"127.0.0.1:{srv.port}"}

    def snapshot() -> dict:
        return parse_metrics(httpx.get(srv.base_url + "/metrics", timeout=5).text, target)

    # Warm-up: every labelled series exists before the window opens (a series born inside
    # a window loses its first increase to Prometheus).
    await run_load(srv.base_url, scale=1)
    wait_idle(srv)
    warmed = time.time()
    baseline = prom.wait_for_scrape_after(warmed)
    before = snapshot()

    started = time.monotonic()
    out = await run_load(srv.base_url, scale=6)
    wait_idle(srv)
    load_s = time.monotonic() - started
    ended = time.time()
    after = snapshot()
    at = prom.wait_for_scrape_after(ended)
    # Evaluated at the last scrape, over a window that starts at the baseline scrape
    # (Prometheus 2 includes both ends): no extrapolation of increases to the edges.
    window = round((at - baseline) * 1000)
    print(f"\nload: {dict(out.statuses)} in {load_s:.1f} s; window {window} ms")

    _check_against_the_load(before, after, out)
    reference = Reference(before, after, checked=lambda name: bool(SERVER_SERIES.match(name)))
    variables = grafana_variables(prom)

    queries = dashboard_queries()
    assert queries, "the dashboard has no queries"
    report = [
        check_query(prom, reference, where, _substitute(expr, variables, window), at)
        for where, expr in queries
    ]
    n_quantiles = _check_ttft_quantiles(prom, queries, variables, window, at, out)
    assert n_quantiles >= 3

    rules = alert_rules()
    for rule in rules:
        for i, part in enumerate(operands(rule["expr"])):
            where = f"alert {rule['alert']} operand {i + 1}"
            report.append(check_query(prom, reference, where, _alert_window(part, window), at))

    groups = prom.api("rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"] if r["type"] == "alerting"}
    assert set(loaded) == {r["alert"] for r in rules}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        assert rule["state"] != "firing", (name, rule["alerts"])
    print("\n".join(report))
