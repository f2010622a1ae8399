"""Pure parts of the server: signed URLs, tokens, target conditions, offer selection."""

from __future__ import annotations

import pytest

from otakit.errors import UsageError
from otakit.server.models import Artifact, Deployment, Device
from otakit.server.service.offers import Offer, select_offer
from otakit.server.targeting import matches, parse_condition, product_group_condition, wanted
from otakit.server.tokens import new_token, secret_matches, split_token
from otakit.server.urls import check_signature, new_signing_key, sign_path

NOW = 1_800_000_000.0


def test_signed_urls_expire_and_resist_forgery() -> None:
    key = new_signing_key()
    url = sign_path(key, "/dl/abc/app.img", 3600, now=NOW)
    path, _, query = url.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&"))
    assert check_signature(key, path, params["expires"], params["sig"], now=NOW) is None
    assert check_signature(key, path, params["expires"], params["sig"], now=NOW + 3601) == (
        "the download URL has expired"
    )
    assert "not valid" in (
        check_signature(key, "/dl/abc/other.img", params["expires"], params["sig"], now=NOW) or ""
    )
    later = str(int(params["expires"]) + 86400)  # extending the expiry breaks the signature
    assert "not valid" in (check_signature(key, path, later, params["sig"], now=NOW) or "")
    assert "not valid" in (
        check_signature(new_signing_key(), path, params["expires"], params["sig"], now=NOW) or ""
    )
    assert "not signed" in (check_signature(key, path, None, None, now=NOW) or "")
    assert "not signed" in (check_signature(key, path, "soon", "x", now=NOW) or "")


def test_tokens_store_only_a_hash() -> None:
    minted = new_token()
    token_id, secret = split_token(minted.token) or ("", "")
    assert token_id == minted.id
    assert secret not in minted.secret_hash
    assert secret_matches(secret, minted.secret_hash)
    assert not secret_matches(secret + "x", minted.secret_hash)
    for bad in ("", "otk_", "otk_id_", "Bearer x", "xyz_a_b"):
        assert split_token(bad) is None


def test_conditions() -> None:
    condition = product_group_condition("sensor", "field")
    assert condition == "tags.productType='sensor' AND tags.deviceGroup='field'"
    assert parse_condition(condition) == {"productType": "sensor", "deviceGroup": "field"}
    assert parse_condition("tags.a='x' and tags.b = 'it\\'s'") == {"a": "x", "b": "it's"}
    assert matches({"a": "x"}, {"a": "x", "b": "y"})
    assert not matches({"a": "x", "c": "z"}, {"a": "x"})
    for bad in ("", "tags.a=x", "tags.a='x' OR tags.b='y'", "tags.a='x' AND tags.a='y'", "a='x'"):
        with pytest.raises(UsageError):
            parse_condition(bad)


def _parts(offer: Offer) -> tuple[Deployment, Artifact]:
    return offer.deployment, offer.artifact


def _offer(
    version: str,
    *,
    priority: int = 0,
    downgrade: bool = False,
    board: str | None = None,
    group: str = "g",
) -> Offer:
    return Offer(
        Deployment(
            condition=product_group_condition("p", group), priority=priority, downgrade=downgrade
        ),
        Artifact(version=version, board=board),
    )


def test_offer_selection() -> None:
    device = Device(
        serial="s",
        product="p",
        board="B",
        version="1.2.0",
        tags={"productType": "p", "deviceGroup": "g"},
    )
    assert wanted(*_parts(_offer("1.2.1")), "1.2.0")
    assert not wanted(*_parts(_offer("1.2.0")), "1.2.0")
    assert not wanted(*_parts(_offer("1.1.9")), "1.2.0")
    assert wanted(*_parts(_offer("1.1.9", downgrade=True)), "1.2.0")
    assert wanted(*_parts(_offer("3")), None)
    offers = [
        _offer("2.0.0", board="OTHER"),
        _offer("1.0.0"),
        _offer("1.5.0", group="h"),
        _offer("1.3.0"),
    ]
    chosen = select_offer(device, offers)
    assert chosen is not None
    assert chosen.artifact.version == "1.3.0"
    assert select_offer(device, offers[:3]) is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-4095", (0, 4095)),
        ("bytes=4096-8191", (4096, 8191)),
        ("bytes=9000-99999", (9000, 9999)),  # clamped to the end
        ("bytes=9990-", (9990, 9999)),
        ("bytes=-10", (9990, 9999)),
        ("bytes=-20000", (0, 9999)),
        ("bytes=9-3", None),  # invalid spec: ignored
        ("items=0-5", None),
        ("bytes=a-b", None),
        ("bytes=10000-", "416"),
        ("bytes=-0", "416"),
    ],
)
def test_range_header(header: str | None, expected: object) -> None:
    from otakit.server.downloads import _single_range, _Unsatisfiable

    if expected == "416":
        with pytest.raises(_Unsatisfiable):
            _single_range(header, 10000)
    else:
        assert _single_range(header, 10000) == expected
