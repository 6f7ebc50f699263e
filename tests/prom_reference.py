"""What a PromQL query should return, worked out from two /metrics snapshots.

The Prometheus test (tests/integration/test_prometheus.py) scrapes the server's /metrics
itself just before and just after a load, and asks Prometheus the dashboard's and the
alerts' queries over a window that spans exactly that load. This module evaluates the
same queries on the two snapshots, for the subset of PromQL the dashboard and alerts use:
selectors, `rate`/`increase`, `sum`/`max`/`min`/`avg`/`count` with `by`/`without`,
`histogram_quantile`, and arithmetic between them. Anything else raises `Unsupported`
(the caller then only checks that Prometheus returned series).

The caller evaluates at the instant of the last scrape, over a window that starts at the
baseline scrape: Prometheus then extrapolates no increase to the window's edges, and its
answers equal these (to float rounding).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable

import promql_parser as pp
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]
NAME = "__name__"


class Unsupported(Exception):
    """A query outside the subset this module evaluates (or not predictable from snapshots)."""


Vector = dict[Labels, float]


def parse_metrics(text: str, target_labels: dict[str, str]) -> dict[Labels, float]:
    """One /metrics exposition as {labels including __name__ and the target's: value}."""
    series: dict[Labels, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {**s.labels, **target_labels, NAME: s.name}
            series[frozenset(labels.items())] = float(s.value)
    return series


def _matches(labels: dict[str, str], matchers: Iterable[pp.Matcher]) -> bool:
    for m in matchers:
        have = labels.get(m.name, "")  # an absent label matches as ""
        if m.op == pp.MatchOp.Equal:
            ok = have == m.value
        elif m.op == pp.MatchOp.NotEqual:
            ok = have != m.value
        elif m.op == pp.MatchOp.Re:
            ok = re.fullmatch(m.value, have) is not None
        else:
            ok = re.fullmatch(m.value, have) is None
        if not ok:
            return False
    return True


def _select(snapshot: dict[Labels, float], vs: pp.VectorSelector) -> dict[Labels, float]:
    if vs.offset is not None or vs.at is not None:
        raise Unsupported("offset/@ modifiers")
    matchers = list(vs.matchers.matchers)
    out = {}
    for key, value in snapshot.items():
        labels = dict(key)
        if vs.name and labels[NAME] != vs.name:
            continue
        if _matches(labels, matchers):
            out[key] = value
    return out


def _without_name(key: Labels) -> Labels:
    return frozenset((k, v) for k, v in key if k != NAME)


class Reference:
    """Evaluates queries on `before`/`after` snapshots; `after` is the instant of evaluation
    and the queries' ranges are taken to span exactly from `before` to `after`."""

    def __init__(
        self,
        before: dict[Labels, float],
        after: dict[Labels, float],
        *,
        checked: Callable[[str], bool] = lambda name: True,
    ) -> None:
        self.before, self.after = before, after
        self.checked = checked  # series names whose values are predictable

    def evaluate(self, expr: str) -> Vector | float:
        return self._eval(pp.parse(expr))

    def _eval(self, node: object) -> Vector | float:
        if isinstance(node, pp.ParenExpr):
            return self._eval(node.expr)
        if isinstance(node, pp.NumberLiteral):
            return float(node.val)
        if isinstance(node, pp.VectorSelector):
            self._check_names(node)
            return _select(self.after, node)
        if isinstance(node, pp.Call):
            return self._call(node)
        if isinstance(node, pp.AggregateExpr):
            return self._aggregate(node)
        if isinstance(node, pp.BinaryExpr):
            return self._binary(node)
        raise Unsupported(type(node).__name__)

    def _check_names(self, vs: pp.VectorSelector) -> None:
        if not vs.name or not self.checked(vs.name):
            raise Unsupported(f"values of {vs.name} are not predictable from snapshots")

    def _call(self, node: pp.Call) -> Vector:
        name = node.func.name
        if name in ("rate", "increase"):
            (matrix,) = node.args
            assert isinstance(matrix, pp.MatrixSelector)
            vs = matrix.vector_selector
            self._check_names(vs)
            seconds = matrix.range.total_seconds()
            before, after = _select(self.before, vs), _select(self.after, vs)
            if set(before) != set(after):
                # A series born inside the window: Prometheus misses its first increase.
                raise Unsupported(f"{vs.name}: series appeared during the window")
            scale = 1 / seconds if name == "rate" else 1.0
            return {_without_name(k): (after[k] - before[k]) * scale for k in after}
        if name == "histogram_quantile":
            q, vector = node.args
            q_value = self._eval(q)
            buckets = self._eval(vector)
            assert isinstance(q_value, float) and isinstance(buckets, dict)
            return histogram_quantile(q_value, buckets)
        raise Unsupported(f"function {name}")

    def _aggregate(self, node: pp.AggregateExpr) -> Vector:
        op = str(node.op)
        inner = self._eval(node.expr)
        if not isinstance(inner, dict) or node.param is not None:
            raise Unsupported(f"aggregation {op} with a parameter")
        groups: dict[Labels, list[float]] = defaultdict(list)
        for key, value in inner.items():
            groups[_group_key(key, node.modifier)].append(value)
        combine = AGGREGATIONS.get(op)
        if combine is None:
            raise Unsupported(f"aggregation {op}")
        return {key: float(combine(values)) for key, values in groups.items()}

    def _binary(self, node: pp.BinaryExpr) -> Vector | float:
        op = str(node.op)
        if op not in ARITHMETIC:
            raise Unsupported(f"operator {op} (evaluate its operands instead)")
        lhs, rhs = self._eval(node.lhs), self._eval(node.rhs)
        apply = ARITHMETIC[op]
        if isinstance(lhs, float) and isinstance(rhs, float):
            return apply(lhs, rhs)
        if isinstance(lhs, float):
            assert isinstance(rhs, dict)
            return {_without_name(k): apply(lhs, v) for k, v in rhs.items()}
        if isinstance(rhs, float):
            return {_without_name(k): apply(v, rhs) for k, v in lhs.items()}
        return self._vector_vector(lhs, rhs, apply, node.modifier)

    @staticmethod
    def _vector_vector(
        lhs: Vector, rhs: Vector, apply: Callable[[float, float], float], modifier: object
    ) -> Vector:
        def matching_key(key: Labels) -> Labels:
            key = _without_name(key)
            matching = getattr(modifier, "matching", None)
            if matching is None:
                return key
            labels = set(matching.labels)
            include = str(matching.type).endswith("Include")
            return frozenset((k, v) for k, v in key if (k in labels) == include)

        card = getattr(modifier, "card", None)
        if card is not None and not str(card).endswith("OneToOne"):
            raise Unsupported("group_left/group_right")
        right = {matching_key(k): v for k, v in rhs.items()}
        return {
            matching_key(k): apply(v, right[matching_key(k)])
            for k, v in lhs.items()
            if matching_key(k) in right
        }


def _group_key(key: Labels, modifier: object) -> Labels:
    if modifier is None:
        return frozenset()
    labels = set(modifier.labels)  # type: ignore[attr-defined]
    by = str(modifier.type).endswith("By")  # type: ignore[attr-defined]
    return frozenset((k, v) for k, v in key if k != NAME and ((k in labels) == by))


def _div(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.copysign(math.inf, a)
    return a / b


ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": _div,
}
AGGREGATIONS: dict[str, Callable[[list[float]], float]] = {
    "sum": sum,
    "max": max,
    "min": min,
    "avg": lambda xs: sum(xs) / len(xs),
    "count": len,
}


def histogram_quantile(q: float, buckets: Vector) -> Vector:
    """Prometheus's histogram_quantile (classic buckets, linear within a bucket)."""
    groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for key, value in buckets.items():
        labels = dict(key)
        if "le" not in labels:
            continue
        upper = float(labels.pop("le"))
        labels.pop(NAME, None)
        groups[frozenset(labels.items())].append((upper, value))
    return {key: _quantile(q, sorted(points)) for key, points in groups.items()}


def _quantile(q: float, points: list[tuple[float, float]]) -> float:
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    if not points or points[-1][0] != math.inf or len(points) < 2:
        return math.nan
    counts = []
    for _, c in points:  # Prometheus makes the counts monotonic first
        counts.append(max(c, counts[-1]) if counts else c)
    total = counts[-1]
    if total == 0 or math.isnan(total):
        return math.nan
    rank = q * total
    b = next(i for i, c in enumerate(counts) if c >= rank)
    if b == len(points) - 1:
        return points[-2][0]
    if b == 0 and points[0][0] <= 0:
        return points[0][0]
    start = 0.0 if b == 0 else points[b - 1][0]
    end = points[b][0]
    below = 0.0 if b == 0 else counts[b - 1]
    in_bucket = counts[b] - below
    return start + (end - start) * (rank - below) / in_bucket


def agrees(got: float, want: float) -> bool:
    """Prometheus's `got` equals the reference's `want` (to float rounding)."""
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)


def operands(expr: str) -> list[str]:
    """The parts of an alert expression that compute values: the sides of its comparisons
    and set operators (`and`, `or`, `unless`), literals left out."""
    out: list[str] = []

    def visit(node: object) -> None:
        if isinstance(node, pp.ParenExpr):
            visit(node.expr)
        elif isinstance(node, pp.BinaryExpr) and str(node.op) not in ARITHMETIC:
            visit(node.lhs)
            visit(node.rhs)
        elif not isinstance(node, pp.NumberLiteral):
            out.append(str(node))

    visit(pp.parse(expr))
    return out
