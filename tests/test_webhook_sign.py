"""Standard Webhooks signing and verification (agentmount/webhooks.py): pure logic, no mounts."""
from __future__ import annotations

import base64
import email.message
import json

import pytest

from agentmount import webhooks
from agentmount.webhooks import WebhookVerificationError, generate_secret, headers, parse_secret, sign, verify

# Test vector from the Standard Webhooks / Svix documentation.
VEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VEC_TS = 1614265330
VEC_BODY = b'{"test": 2432232314}'
VEC_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

NOW = 1_700_000_000
BODY = json.dumps({"type": "file.changed", "data": {"path": "/a/b.txt", "seq": 7}}).encode()


def _signed(secret: str | None = None, msg_id: str = "msg_1", ts: int = NOW, body: bytes = BODY) -> dict[str, str]:
    return headers(secret or SECRET, msg_id, ts, body)


SECRET = generate_secret()


def test_known_vector() -> None:
    assert sign(VEC_SECRET, VEC_ID, VEC_TS, VEC_BODY) == VEC_SIG
    hdrs = {"webhook-id": VEC_ID, "webhook-timestamp": str(VEC_TS), "webhook-signature": VEC_SIG}
    assert verify(hdrs, VEC_BODY, VEC_SECRET, now=VEC_TS + 10) == {"test": 2432232314}


def test_headers_shape() -> None:
    h = _signed()
    assert set(h) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert h["webhook-id"] == "msg_1"
    assert h["webhook-timestamp"] == str(NOW)
    assert h["content-type"] == "application/json"
    version, sig = h["webhook-signature"].split(",", 1)
    assert version == "v1" and len(base64.b64decode(sig, validate=True)) == 32


def test_round_trip() -> None:
    assert verify(_signed(), BODY, SECRET, now=NOW) == json.loads(BODY)
    # body given as str works too; tolerance is inclusive at both edges
    assert verify(_signed(), BODY.decode(), SECRET, now=NOW + 300)["data"]["seq"] == 7
    assert verify(_signed(), BODY, SECRET, now=NOW - 300)["type"] == "file.changed"


def test_generate_secret_is_valid_and_random() -> None:
    a, b = generate_secret(), generate_secret()
    assert a != b and a.startswith("whsec_")
    assert len(parse_secret(a)) == 32


def test_wrong_secret() -> None:
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(_signed(), BODY, generate_secret(), now=NOW)


def test_tampered_body() -> None:
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(_signed(), BODY.replace(b"7", b"8"), SECRET, now=NOW)


def test_tampered_id_or_timestamp() -> None:
    h = _signed()
    h["webhook-id"] = "msg_2"
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(h, BODY, SECRET, now=NOW)
    h = _signed()
    h["webhook-timestamp"] = str(NOW + 1)
    with pytest.raises(WebhookVerificationError, match="no signature"):
        verify(h, BODY, SECRET, now=NOW)


def test_old_and_future_timestamp() -> None:
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(_signed(ts=NOW - 301), BODY, SECRET, now=NOW)
    with pytest.raises(WebhookVerificationError, match="future"):
        verify(_signed(ts=NOW + 301), BODY, SECRET, now=NOW)
    # a custom tolerance widens the window
    assert verify(_signed(ts=NOW - 3000), BODY, SECRET, now=NOW, tolerance=3600)["data"]["path"] == "/a/b.txt"


@pytest.mark.parametrize("bad", ["abc", "1.5", "-5", "", " ", "1e9", "+1700000000"])
def test_non_integer_timestamp(bad: str) -> None:
    h = _signed()
    h["webhook-timestamp"] = bad
    with pytest.raises(WebhookVerificationError, match="webhook-timestamp"):
        verify(h, BODY, SECRET, now=NOW)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header(name: str) -> None:
    h = _signed()
    del h[name]
    with pytest.raises(WebhookVerificationError, match=f"missing required header.*{name}"):
        verify(h, BODY, SECRET, now=NOW)


def test_multiple_signatures_key_rotation() -> None:
    old, new = generate_secret(), generate_secret()
    sig_old = sign(old, "msg_1", NOW, BODY)
    sig_new = sign(new, "msg_1", NOW, BODY)
    h = {"webhook-id": "msg_1", "webhook-timestamp": str(NOW), "webhook-signature": f"{sig_old} {sig_new}"}
    assert verify(h, BODY, old, now=NOW)["data"]["seq"] == 7
    assert verify(h, BODY, new, now=NOW)["data"]["seq"] == 7
    with pytest.raises(WebhookVerificationError):
        verify(h, BODY, generate_secret(), now=NOW)


def test_other_versions_ignored() -> None:
    good = sign(SECRET, "msg_1", NOW, BODY)
    _, raw = good.split(",", 1)
    h = {"webhook-id": "msg_1", "webhook-timestamp": str(NOW), "webhook-signature": f"v1a,garbage v2,{raw} {good}"}
    assert verify(h, BODY, SECRET, now=NOW)["type"] == "file.changed"
    # the right bytes under a different version tag do not count
    h["webhook-signature"] = f"v2,{raw} v1a,{raw}"
    with pytest.raises(WebhookVerificationError, match="no 'v1,<signature>' entry"):
        verify(h, BODY, SECRET, now=NOW)


def test_mixed_case_headers() -> None:
    h = {k.title(): v for k, v in _signed().items()}
    assert "Webhook-Signature" in h and "webhook-signature" not in h
    assert verify(h, BODY, SECRET, now=NOW)["data"]["seq"] == 7
    h = {k.upper(): v for k, v in _signed().items()}
    assert verify(h, BODY, SECRET, now=NOW)["data"]["seq"] == 7


def test_message_like_headers() -> None:
    msg = email.message.Message()
    for k, v in _signed().items():
        msg[k.upper()] = v
    assert verify(msg, BODY, SECRET, now=NOW)["data"]["path"] == "/a/b.txt"


def test_object_with_only_get() -> None:
    class OnlyGet:
        def __init__(self, d: dict[str, str]) -> None:
            self.d = d

        def get(self, name: str, default: str | None = None) -> str | None:
            return self.d.get(name.lower(), default)

    assert verify(OnlyGet(_signed()), BODY, SECRET, now=NOW)["data"]["seq"] == 7


def test_conflicting_duplicate_headers() -> None:
    h = _signed()
    h["WEBHOOK-ID"] = "msg_other"
    with pytest.raises(WebhookVerificationError, match="more than once"):
        verify(h, BODY, SECRET, now=NOW)


def test_non_json_body_refused_even_if_signed() -> None:
    body = b"not json"
    with pytest.raises(WebhookVerificationError, match="not valid JSON"):
        verify(headers(SECRET, "m", NOW, body), body, SECRET, now=NOW)
    body = b"[1, 2]"
    with pytest.raises(WebhookVerificationError, match="expected an object"):
        verify(headers(SECRET, "m", NOW, body), body, SECRET, now=NOW)


@pytest.mark.parametrize("bad, why", [
    ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "must start with 'whsec_'"),
    ("whsec_", "0 bytes"),
    ("whsec_not base64!!", "not valid standard base64"),
    ("whsec_" + base64.b64encode(b"x" * 16).decode(), "16 bytes"),
    ("whsec_" + base64.b64encode(b"x" * 23).decode(), "23 bytes"),
    ("whsec_" + base64.b64encode(b"x" * 65).decode(), "65 bytes"),
    ("whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(), "not valid standard base64"),
    ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS", "not valid standard base64"),  # bad padding
])
def test_parse_secret_rejects(bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as exc:
        parse_secret(bad)
    assert "\n" not in str(exc.value)
    assert "24..64" in str(exc.value)


def test_parse_secret_accepts_bounds() -> None:
    assert len(parse_secret(VEC_SECRET)) == 24
    assert parse_secret("whsec_" + base64.b64encode(b"k" * 64).decode()) == b"k" * 64


def test_bad_secret_in_verify_is_value_error() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        verify(_signed(), BODY, "secret", now=NOW)
    # a malformed receiver secret is a configuration error, not a forged request
    with pytest.raises(ValueError) as exc:
        verify(_signed(), BODY, "whsec_short", now=NOW)
    assert not isinstance(exc.value, WebhookVerificationError)
    assert webhooks.DEFAULT_TOLERANCE == 300
