"""Priority classes as units (no engine): settings, keys file, class assignment,
the admission arithmetic (headroom, weighted fair share) and its fairness under load."""

from __future__ import annotations

import heapq
import random

import pytest

from engine.api.admission import Admission, Ticket
from engine.api.auth import ANONYMOUS, ApiKey, KeyFileError, KeyStore
from engine.api.errors import APIError
from engine.api.fair_share import FAIR_SHARE, QUEUE_FULL, ClassLedger
from engine.api.priority import PriorityClasses
from engine.config import (
    AuthConfig,
    ConfigError,
    PriorityClassSpec,
    PriorityConfig,
    build_settings,
    parse_priority_classes,
    resolve,
)
from engine.llm import engine_args
from engine.metrics import EngineGauges, Metrics

# ---------------------------------------------------------------- settings


def test_default_classes():
    cfg = build_settings(env={}).priority
    assert cfg.scheduling_policy == "fcfs" and cfg.fim_priority_class is None
    assert [(c.name, c.priority, c.queue_share) for c in cfg.classes()] == [
        ("interactive", 0, 1.0),
        ("default", 10, 0.75),
        ("batch", 20, 0.5),
    ]


def test_classes_from_a_flag_sorted_by_priority():
    s = build_settings(
        env={},
        overrides={
            "priority_classes": "bulk priority=5 queue_share=0.2, live priority=-1",
            "default_priority_class": "bulk",
            "scheduling_policy": "priority",
        },
    )
    assert [c.name for c in s.priority.classes()] == ["live", "bulk"]
    assert engine_args(resolve(s, gpu=False), "/m").scheduling_policy == "priority"
    assert engine_args(resolve(build_settings(env={}), gpu=False), "/m").scheduling_policy == "fcfs"


@pytest.mark.parametrize(
    ("classes", "fragment"),
    [
        ("Fast priority=0", "must match"),
        ("a priority=zero", "priority is an integer"),
        ("a queue_share=1", "give priority="),
        ("a priority=0 colour=red", "give priority="),
        ("a priority=0, b priority=0 queue_share=0.5", "priorities must be unique"),
        ("a priority=0, a priority=1", "names must be unique"),
        ("a priority=0 queue_share=0.5", "must have queue_share=1"),
        ("a priority=0, b priority=1 queue_share=1.5", "in [0, 1]"),
        ("a priority=0, b priority=1 queue_share=0.2, c priority=2 queue_share=0.4", "more of"),
        (",".join(f"c{i} priority={i}" for i in range(9)), "1 to 8 classes"),
    ],
)
def test_bad_class_tables_name_the_flag(classes, fragment):
    with pytest.raises(ConfigError) as e:
        build_settings(env={}, overrides={"priority_classes": classes})
    assert "--priority-classes" in str(e.value) and fragment in str(e.value)


def test_named_classes_must_exist():
    for setting in ("default_priority_class", "fim_priority_class"):
        with pytest.raises(ConfigError, match="is not one of the classes"):
            build_settings(env={}, overrides={setting: "gold"})


def test_class_table_parses_the_documented_syntax():
    assert parse_priority_classes(" x priority=3 ,, y priority=4 queue_share=0 ") == [
        PriorityClassSpec("x", 3, 1.0),
        PriorityClassSpec("y", 4, 0.0),
    ]


# ---------------------------------------------------------------- keys file


def test_keys_file_priority_and_weight(tmp_path):
    f = tmp_path / "keys"
    f.write_text("sk-ci name=ci priority=batch weight=2.5\nsk-ed name=ed priority=interactive\n")
    store = KeyStore.from_config(AuthConfig(api_keys_file=str(f), api_keys="sk-plain"))
    ci, ed, plain = store.lookup("sk-ci"), store.lookup("sk-ed"), store.lookup("sk-plain")
    assert (ci.priority_class, ci.weight) == ("batch", 2.5)
    assert (ed.priority_class, ed.weight) == ("interactive", 1.0)
    assert (plain.priority_class, plain.weight) == (None, 1.0)
    PriorityClasses(PriorityConfig()).check_keys(store)  # all known


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("sk-x weight=0", "weight must be a positive number"),
        ("sk-x weight=-1", "weight must be a positive number"),
        ("sk-x weight=inf", "weight must be a positive number"),
        ("sk-x weight=heavy", "weight must be a positive number"),
        ("sk-x priority=Batch!", "priority must name a priority class"),
        ("sk-x colour=red", "expected name=, rpm=, tpm=, priority=, weight="),
    ],
)
def test_bad_priority_options(tmp_path, line, fragment):
    f = tmp_path / "keys"
    f.write_text(line + "\n")
    with pytest.raises(KeyFileError, match=fragment) as e:
        KeyStore.from_config(AuthConfig(api_keys_file=str(f)))
    assert f"{f}:1" in str(e.value)


def test_a_key_naming_an_unknown_class_stops_the_start():
    store = KeyStore.from_config(AuthConfig(api_keys="sk-x name=x priority=gold"))
    with pytest.raises(KeyFileError, match="'x': priority=gold is not one of"):
        PriorityClasses(PriorityConfig()).check_keys(store)


# ---------------------------------------------------------------- assignment

BATCH = ApiKey("ci", priority_class="batch")
EDITOR = ApiKey("editor", priority_class="interactive")


def classes(**cfg) -> PriorityClasses:
    return PriorityClasses(PriorityConfig(scheduling_policy="priority", **cfg))


def assign(pc: PriorityClasses, key: ApiKey, requested=None, infill=False, max_tokens=16):
    a = pc.assign(key, requested, infill=infill, max_tokens=max_tokens)
    return a.name, a.engine_priority, a.clamped


def test_a_request_runs_in_its_keys_class_by_default():
    pc = classes()
    assert assign(pc, BATCH) == ("batch", 20, False)
    assert assign(pc, EDITOR) == ("interactive", 0, False)
    assert assign(pc, ANONYMOUS) == ("default", 10, False)


def test_asking_above_the_keys_class_is_clamped():
    pc = classes()
    assert assign(pc, BATCH, 0) == ("batch", 20, True)  # vLLM's own default priority
    assert assign(pc, BATCH, "interactive") == ("batch", 20, True)
    assert assign(pc, BATCH, -(2**63)) == ("batch", 20, True)
    assert assign(pc, ANONYMOUS, 5) == ("default", 10, True)


def test_asking_for_less_is_granted_with_vllms_integer_or_a_class_name():
    pc = classes()
    assert assign(pc, EDITOR, "batch") == ("batch", 20, False)
    assert assign(pc, EDITOR, 5) == ("interactive", 5, False)  # within the interactive band
    assert assign(pc, EDITOR, 10) == ("default", 10, False)
    assert assign(pc, EDITOR, 99) == ("batch", 99, False)  # below the lowest class: its band
    assert assign(pc, BATCH, 21) == ("batch", 21, False)


def test_an_unknown_class_name_is_a_400():
    with pytest.raises(APIError) as e:
        classes().assign(BATCH, "gold", infill=False, max_tokens=1)
    assert (e.value.status, e.value.param, e.value.code) == (
        400,
        "priority",
        "unknown_priority_class",
    )


def test_fim_rule_applies_only_to_small_fim_requests_of_unclassed_keys():
    assert assign(classes(), ANONYMOUS, infill=True, max_tokens=8)[0] == "default"  # off
    pc = classes(fim_priority_class="interactive", fim_priority_max_tokens=32)
    assert assign(pc, ANONYMOUS, infill=True, max_tokens=32) == ("interactive", 0, False)
    assert assign(pc, ANONYMOUS, infill=True, max_tokens=33)[0] == "default"
    assert assign(pc, ANONYMOUS, infill=False, max_tokens=8)[0] == "default"
    assert assign(pc, BATCH, infill=True, max_tokens=8)[0] == "batch"  # a classed key: never
    assert assign(pc, ANONYMOUS, "batch", infill=True, max_tokens=8)[0] == "batch"  # asked
    assert pc.best_for(ANONYMOUS).name == "interactive" and pc.best_for(BATCH).name == "batch"


def test_fcfs_sends_priority_zero_to_the_engine_but_keeps_the_class():
    pc = PriorityClasses(PriorityConfig())
    assert not pc.enabled
    assert assign(pc, BATCH) == ("batch", 0, False)
    assert assign(pc, BATCH, "interactive") == ("batch", 0, True)


# ---------------------------------------------------------------- the ledger's arithmetic

SPECS = [
    PriorityClassSpec("interactive", 0, 1.0),
    PriorityClassSpec("default", 10, 0.75),
    PriorityClassSpec("batch", 20, 0.5),
]


def test_bounds_keep_headroom_for_the_classes_above():
    ledger = ClassLedger(SPECS, max_num_seqs=8, max_waiting=10, window_s=5)
    assert ledger.bounds == {"interactive": 18, "default": 15, "batch": 13}
    ledger.add("batch", "ci", 13)
    assert ledger.check("batch", "ci2", 1, 1, now=0) == QUEUE_FULL
    assert ledger.check("default", "x", 1, 2, now=0) is None
    assert ledger.check("default", "x", 1, 3, now=0) == QUEUE_FULL
    assert ledger.check("interactive", "ed", 1, 5, now=0) is None
    assert ledger.capacity("batch") == 13 and ledger.capacity("interactive") == 18 - 13
    ledger.add("interactive", "ed", 5)
    assert ledger.capacity("batch") == 8  # what the class above holds is not the batch's


def test_a_key_alone_in_its_class_is_limited_by_the_bound_only():
    ledger = ClassLedger(SPECS, 8, 10, 5)
    for _ in range(13):
        assert ledger.check("batch", "ci", 1, 1, now=0) is None
        ledger.add("batch", "ci", 1)
    assert ledger.check("batch", "ci", 1, 1, now=0) == QUEUE_FULL


def test_levels_split_what_competing_keys_may_hold_by_weight():
    ledger = ClassLedger(SPECS, 8, 10, window_s=5)  # batch holds up to 13
    ledger.add("batch", "satisfied", 1)  # holds 1, asks for nothing more
    ledger.add("batch", "a", 6)
    ledger.refused("batch", "b", weight=3, now=0)  # b wants a share
    # a (weight 1) competes with b (weight 3) for 13 - 1 = 12 sequences.
    assert ledger.level("batch", "a", 1, now=1) == pytest.approx(3.0)
    assert ledger.check("batch", "a", 1, 1, now=1) == FAIR_SHARE  # room remains: b's
    # Until a is refused, b sees a as satisfied with its 6: b may have the rest.
    assert ledger.level("batch", "b", 3, now=1) == pytest.approx(13 - 1 - 6)
    ledger.refused("batch", "a", 1, now=1)
    assert ledger.level("batch", "b", 3, now=1) == pytest.approx(9.0)
    assert ledger.check("batch", "b", 3, 1, now=1) is None
    # Once b's refusal is older than the window, a is alone again.
    assert ledger.level("batch", "a", 1, now=6.5) == pytest.approx(12.0)
    assert ledger.check("batch", "a", 1, 1, now=6.5) is None


def test_a_key_holding_nothing_is_never_refused_for_fair_share():
    ledger = ClassLedger(SPECS, 1, 2, window_s=5)  # batch: 2
    for k in "bcde":
        ledger.refused("batch", k, 1, now=0)
    assert ledger.level("batch", "a", 1, now=0) < 1
    assert ledger.check("batch", "a", 1, 1, now=0) is None


def test_no_admission_takes_a_key_above_its_level():
    rng = random.Random(7)
    ledger = ClassLedger(SPECS, 4, 12, window_s=2)
    held: list[tuple[str, int]] = []
    for step in range(3000):
        now = step * 0.01
        key, n = rng.choice("abcd"), rng.choice((1, 1, 2, 4))
        weight = {"a": 1, "b": 2, "c": 1, "d": 4}[key]
        if ledger.check("batch", key, weight, n, now) is None:
            level = ledger.level("batch", key, weight, now)
            before = ledger.held["batch"].get(key, 0)
            assert before == 0 or before + n <= level + 1e-9
            ledger.add("batch", key, n)
            held.append((key, n))
        else:
            ledger.refused("batch", key, weight, now)
        if held and rng.random() < 0.4:
            k, m = held.pop(rng.randrange(len(held)))
            ledger.remove("batch", k, m)
        assert ledger.total <= ledger.bounds["batch"]
        assert ledger.total == sum(ledger.held["batch"].values()) == ledger.admitted["batch"]


# ---------------------------------------------------------------- Admission


def admission(policy="priority", clock=None, **priority) -> Admission:
    settings = build_settings(
        file_values={
            "engine": {"max_num_seqs": 4},
            "admission": {"max_waiting_requests": 8},
            "priority": {"scheduling_policy": policy, **priority},
        },
        env={},
    )
    zero = lambda: 0.0  # noqa: E731
    metrics = Metrics(EngineGauges(zero, zero, zero, zero, zero), lambda: "")
    return Admission(resolve(settings, gpu=False), metrics, clock=clock or (lambda: 0.0))


def sample(adm: Admission, name: str, **labels: str) -> float:
    value = adm.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_batch_is_refused_first_as_the_queue_fills():
    adm = admission()  # bounds: interactive 12, default 10, batch 8
    for _ in range(8):
        adm.reserve(BATCH, 1, 1, "batch")
    with pytest.raises(APIError) as e:
        adm.reserve(BATCH, 1, 1, "batch")
    assert (e.value.status, e.value.code) == (429, "queue_full_batch")
    assert int(e.value.headers["Retry-After"]) >= 1
    assert adm.precheck(BATCH).code == "queue_full_batch"  # the gate refuses it unread
    assert adm.precheck(EDITOR) is None
    tickets = [adm.reserve(EDITOR, 1, 1, "interactive") for _ in range(4)]
    assert adm.full and adm.precheck(EDITOR).code == "queue_full_interactive"
    tickets[0].release(0)
    assert adm.precheck(EDITOR) is None
    assert sample(adm, "codellama_serve_class_requests_refused_total",
                  priority_class="batch", reason="queue_full") == 2  # fmt: skip
    assert sample(adm, "codellama_serve_class_admitted_sequences", priority_class="batch") == 8


def test_fcfs_keeps_one_bound_for_every_class():
    adm = admission("fcfs")
    for _ in range(12):
        adm.reserve(BATCH, 1, 1, "batch")
    assert adm.full and adm.precheck(EDITOR).code == "queue_full"
    with pytest.raises(APIError, match="at capacity"):
        adm.reserve(EDITOR, 1, 1, "interactive")


def test_class_waiting_counts_until_the_first_token():
    adm = admission()
    t: Ticket = adm.reserve(EDITOR, 2, 5, "interactive")
    assert adm.top_class_waiting == 2
    assert sample(adm, "codellama_serve_class_waiting_sequences", priority_class="interactive") == 2
    t.first_token()
    assert adm.top_class_waiting == 0 and adm.ledger.admitted["interactive"] == 2
    t.release(3)
    assert adm.ledger.admitted["interactive"] == 0 and adm.sequences == 0


def test_fair_share_refusal_leaves_the_room_to_the_key_under_its_share():
    adm = admission()  # the batch class holds up to 8
    a, b = ApiKey("a", priority_class="batch"), ApiKey("b", priority_class="batch")
    tickets = [adm.reserve(a, 1, 1, "batch") for _ in range(8)]
    with pytest.raises(APIError):
        adm.reserve(b, 1, 1, "batch")  # the bound: b now competes for the class
    for t in tickets[:5]:
        t.release(0)
    adm.reserve(a, 1, 1, "batch")  # a: 3 + 1 <= 8 / 2
    with pytest.raises(APIError) as e:
        adm.reserve(a, 1, 1, "batch")  # a: 4 + 1 > 4, though 4 places are free
    assert (e.value.status, e.value.code) == (429, "fair_share_batch")
    assert "'a' holds its fair share" in e.value.message
    for _ in range(4):
        adm.reserve(b, 1, 1, "batch")  # the room was left to b
    assert adm.ledger.held["batch"] == {"a": 4, "b": 4}
    assert sample(adm, "codellama_serve_class_requests_refused_total",
                  priority_class="batch", reason="fair_share") == 1  # fmt: skip
    assert sample(adm, "codellama_serve_requests_refused_total", reason="fair_share") == 1


# ---------------------------------------------------------------- fairness under load


def simulate(policy: str, weights: dict[str, float], rates: dict[str, float], seconds=240.0):
    """Open-loop Poisson arrivals per key against a real Admission on a simulated clock;
    each admitted request holds one sequence for 1 s. Admitted requests per key after a
    20 s warm-up."""
    now = [0.0]
    adm = admission(
        policy,
        clock=lambda: now[0],
        priority_classes="interactive priority=0, batch priority=20 queue_share=1",
        default_priority_class="batch",
    )  # both policies get the same bound (12) for the batch class
    keys = {k: ApiKey(k, priority_class="batch", weight=w) for k, w in weights.items()}
    rng = random.Random(1234)
    events: list[tuple[float, int, str, Ticket | None]] = []
    seq = 0
    for k, rate in rates.items():
        heapq.heappush(events, (rng.expovariate(rate), seq, k, None))
        seq += 1
    admitted = dict.fromkeys(keys, 0)
    while events:
        t, _, k, ticket = heapq.heappop(events)
        if t > seconds:
            break
        now[0] = t
        if ticket is not None:  # a request finishes
            ticket.release(1)
            continue
        seq += 1
        heapq.heappush(events, (t + rng.expovariate(rates[k]), seq, k, None))
        if adm.precheck(keys[k]) is not None:
            continue
        try:
            admitted_ticket = adm.reserve(keys[k], 1, 1, "batch")
        except APIError:
            continue
        admitted_ticket.first_token()
        if t > 20:
            admitted[k] += 1
        seq += 1
        heapq.heappush(events, (t + 1.0, seq, k, admitted_ticket))
    return admitted


def test_a_flood_from_one_key_does_not_starve_another_of_the_same_class():
    # Both keys ask for more than half the class (12 sequences, 1 s each): past saturation.
    rates = {"flood": 40.0, "steady": 10.0}
    fair = simulate("priority", {"flood": 1, "steady": 1}, rates)
    ratio = fair["flood"] / fair["steady"]
    print(f"admitted with fair share: {fair} (flood/steady {ratio:.2f})")
    assert 1 / 1.2 <= ratio <= 1.2
    # The same load first come, first served: the flood takes about 4/5 of the class.
    fifo = simulate("fcfs", {"flood": 1, "steady": 1}, rates)
    print(f"admitted first come, first served: {fifo}")
    assert fifo["flood"] / fifo["steady"] > 2.5


def test_shares_follow_the_weights():
    admitted = simulate("priority", {"heavy": 3, "light": 1}, {"heavy": 20.0, "light": 20.0})
    ratio = admitted["heavy"] / admitted["light"]
    print(f"admitted with weights 3:1: {admitted} ({ratio:.2f})")
    assert 3 / 1.2 <= ratio <= 3 * 1.2
