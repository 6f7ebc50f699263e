"""API keys, rate limits and the admission queue as units (no engine)."""

from __future__ import annotations

import hashlib

import pytest

from engine.api.admission import Admission, TokenBucket
from engine.api.auth import ANONYMOUS, ApiKey, KeyFileError, KeyStore, bearer_token
from engine.api.errors import APIError
from engine.config import AuthConfig, build_settings, resolve
from engine.metrics import EngineGauges, Metrics


def test_keys_from_env_and_file(tmp_path):
    f = tmp_path / "keys"
    hashed = hashlib.sha256(b"sk-hashed").hexdigest()
    f.write_text(f"# team keys\nsk-file name=team-a rpm=5 tpm=100\n\nsha256:{hashed} name=ci\n")
    store = KeyStore.from_config(AuthConfig(api_keys="sk-env1, sk-env2", api_keys_file=str(f)))
    assert len(store) == 4
    assert store.lookup("sk-env2").name.startswith("key-")
    a = store.lookup("sk-file")
    assert (a.name, a.rpm, a.tpm) == ("team-a", 5, 100)
    assert store.lookup("sk-hashed").name == "ci"
    assert store.lookup("sk-nope") is None
    assert store.lookup("") is None


def test_only_digests_are_kept():
    store = KeyStore.from_config(AuthConfig(api_keys="sk-secret-value"))
    assert "sk-secret-value" not in repr(store.__dict__)


def test_default_limits_apply_to_keys_without_their_own():
    store = KeyStore.from_config(
        AuthConfig(api_keys="k1, k2 ", rate_limit_rpm=10, rate_limit_tpm=1000)
    )
    assert (store.lookup("k1").rpm, store.lookup("k1").tpm) == (10, 1000)


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("sha256:abc", "64 hex digits"),
        ("sk-x color=red", "unknown option"),
        ("sk-x rpm=ten", "whole numbers"),
    ],
)
def test_bad_key_file_lines(tmp_path, line, fragment):
    f = tmp_path / "keys"
    f.write_text(line + "\n")
    with pytest.raises(KeyFileError, match=fragment) as e:
        KeyStore.from_config(AuthConfig(api_keys_file=str(f)))
    assert f"{f}:1" in str(e.value)


def test_missing_key_file_is_a_clear_error(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read the API keys file"):
        KeyStore.from_config(AuthConfig(api_keys_file=str(tmp_path / "absent")))


def test_bearer_parsing():
    assert bearer_token(b"Bearer abc") == "abc"
    assert bearer_token(b"bearer  abc ") == "abc"
    assert bearer_token(b"Basic abc") is None
    assert bearer_token(b"Bearer ") is None
    assert bearer_token(None) is None


def test_token_bucket_refills_per_minute():
    b = TokenBucket(60, stamp=0.0)  # one per second
    assert b.wait_for(60, 0.0) == 0
    b.take(60, 0.0)
    assert b.wait_for(1, 0.0) == pytest.approx(1.0)
    assert b.wait_for(1, 1.0) == 0
    b.take(100, 1.0)  # completion tokens may overdraw
    assert b.wait_for(1, 1.0) == pytest.approx(100.0)


def _admission(**admission) -> Admission:
    settings = build_settings(
        file_values={"engine": {"max_num_seqs": 4}, "admission": admission}, env={}
    )
    zero = lambda: 0.0  # noqa: E731
    metrics = Metrics(EngineGauges(zero, zero, zero, zero, zero), lambda: "")
    return Admission(resolve(settings, gpu=False), metrics)


def test_queue_bound_counts_sequences_exactly():
    adm = _admission(max_waiting_requests=2)  # 4 in the batch + 2 waiting
    tickets = [adm.reserve(ANONYMOUS, 1, 10) for _ in range(4)]
    tickets.append(adm.reserve(ANONYMOUS, 2, 10))  # n=2 fills the last two places
    assert adm.full
    with pytest.raises(APIError) as e:
        adm.reserve(ANONYMOUS, 1, 10)
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "1"
    tickets[0].release(5)
    tickets[0].release(5)  # idempotent
    assert adm.sequences == 5
    adm.reserve(ANONYMOUS, 1, 10)
    assert adm.metrics.queued_sequences._value.get() == 2


def test_waiting_prompt_tokens_bound():
    adm = _admission(max_waiting_prompt_tokens=100)
    first = adm.reserve(ANONYMOUS, 1, 80)
    with pytest.raises(APIError, match="prompt tokens are waiting"):
        adm.reserve(ANONYMOUS, 1, 30)
    first.first_token()  # prefill done: its prompt no longer waits
    adm.reserve(ANONYMOUS, 1, 30)
    # A single prompt over the bound is still admitted into an empty queue.
    assert _admission(max_waiting_prompt_tokens=10).reserve(ANONYMOUS, 1, 50)


def test_tokens_per_minute_limit():
    adm = _admission()
    key = ApiKey("k", tpm=100)
    t = adm.reserve(key, 1, 60)
    t.release(30)
    with pytest.raises(APIError) as e:
        adm.reserve(key, 1, 60)
    assert e.value.code == "rate_limit_tpm" and int(e.value.headers["Retry-After"]) >= 1


def test_requests_per_minute_limit():
    adm = _admission()
    key = ApiKey("k", rpm=2)
    assert adm.limiter.check_request(key) is None
    assert adm.limiter.check_request(key) is None
    err = adm.limiter.check_request(key)
    assert err is not None and err.status == 429 and err.code == "rate_limit_rpm"
    assert adm.limiter.check_request(ApiKey("other", rpm=2)) is None
