"""The OIDC verifier against a loopback issuer: checks, key rotation, rate-limited refreshes, outages."""

import asyncio
import base64
import time

import jwt
import orjson
import pytest
from oidc_support import AUDIENCE, FakeClock, LoopbackIssuer
from support import eventually

from llama_orch.io.client_auth import OidcSettings
from llama_orch.io.orchestratord.oidc import OidcVerifier, TokenRefused, Verified
from llama_orch.io.waits import within


@pytest.fixture
async def issuer(aiohttp_server):
    issuer = await LoopbackIssuer().start(aiohttp_server)
    issuer.make_key("ec-1", "ES256")
    issuer.make_key("rsa-1", "RS256")
    return issuer


@pytest.fixture
async def make_verifier():
    made = []

    async def make(issuer_url: str, clock=None, **kw) -> OidcVerifier:
        settings = OidcSettings(issuer=issuer_url, audiences=(AUDIENCE,), **kw)
        verifier = OidcVerifier(settings, clock=clock or FakeClock())
        made.append(verifier)
        await verifier.start()
        return verifier

    yield make
    for verifier in made:
        await verifier.stop()


def code(verdict) -> str:
    assert isinstance(verdict, TokenRefused), verdict
    return verdict.code


async def test_a_valid_token_gives_its_subject_with_either_algorithm(issuer, make_verifier):
    verifier = await make_verifier(issuer.url)
    for kid in ("ec-1", "rsa-1"):
        verdict = await verifier.verify(issuer.token(kid, sub=f"user-{kid}"))
        assert isinstance(verdict, Verified) and verdict.principal == f"oidc:user-{kid}"
    assert issuer.hits == {"discovery": 1, "jwks": 1}  # loaded once, then cached
    assert set(verifier.key_ids) == {"ec-1", "rsa-1"}


@pytest.mark.parametrize("claims, expected", [
    (dict(exp=int(time.time()) - 120), "TOKEN_EXPIRED"),
    (dict(nbf=int(time.time()) + 600), "TOKEN_NOT_YET_VALID"),
    (dict(aud="someone-else"), "TOKEN_WRONG_AUDIENCE"),
    (dict(iss="https://evil.example"), "TOKEN_WRONG_ISSUER"),
    (dict(sub=None), "TOKEN_MISSING_CLAIM"),
    (dict(exp=None), "TOKEN_MISSING_CLAIM"),
    (dict(aud=None), "TOKEN_MISSING_CLAIM"),
])
async def test_each_failed_check_is_named(issuer, make_verifier, claims, expected):
    verifier = await make_verifier(issuer.url, leeway_s=30)
    token = issuer.token("ec-1", **claims)
    verdict = await verifier.verify(token)
    assert code(verdict) == expected and verdict.status == 401
    assert token not in verdict.message and token.split(".")[1] not in verdict.message


async def test_the_leeway_covers_a_little_clock_skew(issuer, make_verifier):
    verifier = await make_verifier(issuer.url, leeway_s=30)
    assert isinstance(await verifier.verify(issuer.token(exp=int(time.time()) - 5)), Verified)
    assert isinstance(await verifier.verify(issuer.token(nbf=int(time.time()) + 5)), Verified)


async def test_a_forged_or_tampered_token_fails_its_signature(issuer, make_verifier):
    verifier = await make_verifier(issuer.url)
    issuer.make_key("attacker", "ES256", publish=False)
    forged = issuer.token("attacker", header_kid="ec-1")  # signed by another key, naming a published kid
    assert code(await verifier.verify(forged)) == "TOKEN_BAD_SIGNATURE"
    head, payload, sig = issuer.token("ec-1").split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "admin"
    tampered = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
    assert code(await verifier.verify(f"{head}.{tampered}.{sig}")) == "TOKEN_BAD_SIGNATURE"
    assert code(await verifier.verify("not.a.jwt")) == "BAD_TOKEN"


async def test_none_and_hmac_with_the_public_key_are_refused(issuer, make_verifier):
    verifier = await make_verifier(issuer.url)
    unsigned = jwt.encode(issuer.claims(), None, algorithm="none", headers={"kid": "ec-1"})
    verdict = await verifier.verify(unsigned)
    assert code(verdict) == "TOKEN_ALGORITHM_NOT_ALLOWED" and "'none'" in verdict.message
    # the classic confusion: HS256 keyed with the issuer's public key, which anyone can fetch
    header = base64.urlsafe_b64encode(orjson.dumps({"alg": "HS256", "kid": "rsa-1"})).rstrip(b"=")
    body = base64.urlsafe_b64encode(orjson.dumps(issuer.claims())).rstrip(b"=")
    import hashlib
    import hmac
    mac = hmac.new(issuer.public_pem("rsa-1"), header + b"." + body, hashlib.sha256).digest()
    confused = (header + b"." + body + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()
    assert code(await verifier.verify(confused)) == "TOKEN_ALGORITHM_NOT_ALLOWED"
    # an allowed algorithm that is not its key's
    assert code(await verifier.verify(issuer.token("ec-1", header_kid="rsa-1"))) == "TOKEN_ALGORITHM_NOT_ALLOWED"


def test_settings_refuse_symmetric_algorithms_and_plain_http_off_loopback():
    with pytest.raises(ValueError, match="algorithms"):
        OidcSettings(issuer="https://idp.example", audiences=("a",), algorithms=("HS256",))
    with pytest.raises(ValueError, match="http only on loopback"):
        OidcSettings(issuer="http://idp.example", audiences=("a",))
    assert OidcSettings(issuer="http://127.0.0.1:1", audiences=("a",)).algorithms == ("RS256", "ES256")


async def test_a_rotated_key_is_picked_up_without_a_restart_and_a_withdrawn_one_stops(issuer, make_verifier):
    clock = FakeClock()
    verifier = await make_verifier(issuer.url, clock=clock, jwks_min_refresh_s=30, jwks_max_age_s=600)
    assert isinstance(await verifier.verify(issuer.token("ec-1")), Verified)
    issuer.make_key("ec-2", "ES256")  # the issuer rotates: a new key, used at once
    clock.advance(31)
    verdict = await verifier.verify(issuer.token("ec-2", sub="bob"))
    assert isinstance(verdict, Verified) and verdict.subject == "bob"
    assert issuer.hits["jwks"] == 2  # one refresh, for the unknown kid
    issuer.withdraw("ec-1")
    clock.advance(601)  # the cached keys are old now: refreshed in the background, still serving meanwhile
    assert isinstance(await verifier.verify(issuer.token("ec-2")), Verified)
    await eventually(lambda: "ec-1" not in verifier.key_ids, timeout=10, what="the withdrawn key dropped")
    clock.advance(31)
    assert code(await verifier.verify(issuer.token("ec-1"))) == "TOKEN_UNKNOWN_KEY"


async def test_unknown_kids_cannot_make_a_fetch_storm(issuer, make_verifier):
    clock = FakeClock()
    verifier = await make_verifier(issuer.url, clock=clock, jwks_min_refresh_s=30)
    assert isinstance(await verifier.verify(issuer.token("ec-1")), Verified)
    issuer.make_key("random", "ES256", publish=False)
    clock.advance(31)
    storm = [issuer.token("random", header_kid=f"kid-{i}") for i in range(40)]
    verdicts = await asyncio.gather(*(verifier.verify(t) for t in storm))
    assert {code(v) for v in verdicts} == {"TOKEN_UNKNOWN_KEY"}
    assert issuer.hits["jwks"] == 2  # the load, and one single-flight refresh for all 40
    verdicts = [await verifier.verify(t) for t in storm]  # within the interval: no fetch at all
    assert {code(v) for v in verdicts} == {"TOKEN_UNKNOWN_KEY"} and issuer.hits["jwks"] == 2
    assert isinstance(await verifier.verify(issuer.token("rsa-1")), Verified)  # known keys unaffected


async def test_an_unreachable_issuer_is_503_not_401_and_start_does_not_wait(issuer, make_verifier):
    issuer.down = True
    started = time.monotonic()
    verifier = await make_verifier(issuer.url)
    assert time.monotonic() - started < 1.0
    await eventually(lambda: verifier.last_error is not None, timeout=10, what="the first load failed")
    verdict = await verifier.verify(issuer.token("ec-1"))
    assert verdict.status == 503 and verdict.code == "AUTH_UNAVAILABLE" and verdict.retry_after_ms >= 1000
    assert "HTTP 503" in verifier.last_error  # the detail is the log's (and the operator's)
    assert issuer.url not in verdict.message and "HTTP" not in verdict.message  # not an unauthenticated caller's
    issuer.down = False  # the issuer is back: the background load retries

    async def accepted():
        return isinstance(await verifier.verify(issuer.token("ec-1")), Verified)
    await eventually(accepted, timeout=15, what="the token accepted once the issuer answers")


async def test_a_refresh_that_fails_keeps_the_cached_keys(issuer, make_verifier):
    clock = FakeClock()
    verifier = await make_verifier(issuer.url, clock=clock)
    assert isinstance(await verifier.verify(issuer.token("ec-1")), Verified)
    issuer.down = True
    issuer.make_key("ec-new", "ES256")
    clock.advance(31)
    verdict = await verifier.verify(issuer.token("ec-new"))
    assert verdict.status == 503 and verdict.code == "AUTH_UNAVAILABLE"  # unknown kid, issuer silent: retriable
    assert isinstance(await verifier.verify(issuer.token("ec-1")), Verified)


async def test_first_requests_wait_for_the_one_initial_load(issuer, make_verifier):
    verifier = await make_verifier(issuer.url)
    verdicts = await asyncio.gather(*(verifier.verify(issuer.token("ec-1")) for _ in range(20)))
    assert all(isinstance(v, Verified) for v in verdicts)
    assert issuer.hits == {"discovery": 1, "jwks": 1}


async def test_a_discovery_document_for_another_issuer_is_not_trusted(issuer, make_verifier):
    issuer.discovery_issuer = "https://someone-else.example"
    verifier = await make_verifier(issuer.url)
    await eventually(lambda: verifier.last_error is not None, timeout=10, what="the load refused")
    assert "someone-else" in verifier.last_error and issuer.hits["jwks"] == 0
    assert (await verifier.verify(issuer.token("ec-1"))).status == 503


async def test_symmetric_and_encryption_keys_in_the_jwks_are_skipped(issuer, make_verifier):
    issuer.extra_jwks = [{"kty": "oct", "kid": "shared", "k": base64.urlsafe_b64encode(b"s" * 32).decode()},
                         {**issuer.jwk("ec-1"), "kid": "enc", "use": "enc"},
                         {"kty": "EC", "kid": "broken", "crv": "P-256", "x": "AAAA", "y": "AAAA"}]
    verifier = await make_verifier(issuer.url)
    assert await within(verifier.verify(issuer.token("ec-1")), 10)
    assert set(verifier.key_ids) == {"ec-1", "rsa-1"}


async def test_a_token_without_kid_uses_the_one_key_of_its_type(issuer, make_verifier):
    verifier = await make_verifier(issuer.url)
    verdict = await verifier.verify(issuer.token("ec-1", header_kid=None))
    assert isinstance(verdict, Verified)
    issuer.make_key("ec-2", "ES256")
    fresh = await make_verifier(issuer.url)  # a verifier that sees two EC keys: which one is ambiguous
    assert code(await fresh.verify(issuer.token("ec-1", header_kid=None))) == "TOKEN_UNKNOWN_KEY"
