"""Fuzz targets for what the server parses before it knows who is asking: signed download URLs
(``urls.check_signature``) and Range headers (``downloads.reply``). Whatever the input, the
answer is a refusal or a well-formed reply, never an exception; and a reply's range always lies
inside the file and matches its ``Content-Range``.
"""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from otakit.server.downloads import Blob, reply
from otakit.server.urls import check_signature, new_signing_key, sign_path

KEY = new_signing_key()
PATH = "/dl/" + "a" * 64 + "/app.img"
NOW = 1_800_000_000.0

# text a client controls: any unicode, digit strings of any length, and near-valid values
digits = st.one_of(
    st.text(alphabet="0123456789", min_size=1, max_size=30),
    st.integers(1, 6000).map(lambda n: "9" * n),  # past Python's 4300-digit int() limit too
)
near_sig = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/")
query_value = st.one_of(st.none(), st.text(max_size=100), digits, near_sig)


@settings(max_examples=600)
@given(query_value, query_value, st.text(max_size=200))
def test_signature_check_only_refuses(expires: str | None, sig: str | None, path: str) -> None:
    problem = check_signature(KEY, path or PATH, expires, sig, now=NOW)
    assert problem is not None  # nothing random is a valid signature
    assert problem.startswith("the download URL")


@settings(max_examples=200)
@given(st.integers(0, 10**6), st.text(max_size=3))
def test_valid_signatures_pass_and_any_change_fails(lifetime: int, tamper: str) -> None:
    signed = sign_path(KEY, PATH, lifetime + 1, now=NOW)
    match = re.fullmatch(r"(.*)\?expires=(\d+)&sig=(.*)", signed)
    assert match is not None
    path, expires, sig = match.groups()
    sig = sig.replace("%3D", "=")
    assert check_signature(KEY, path, expires, sig, now=NOW) is None
    assert check_signature(KEY, path + "x", expires, sig, now=NOW) is not None
    assert check_signature(KEY, path, str(int(expires) + 1), sig, now=NOW) is not None
    tampered = sig[:-1] + tamper
    if tampered != sig:
        assert check_signature(KEY, path, expires, tampered, now=NOW) is not None
    assert check_signature(KEY, path, expires, sig, now=int(expires) + 1.0) is not None


range_text = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda a, b, junk: f"bytes={a}-{b}{junk}",
        st.one_of(st.just(""), digits),
        st.one_of(st.just(""), digits),
        st.sampled_from(["", ",", ",0-1", " ", "x", "\u00b2"]),
    ),
)


@settings(max_examples=800)
@given(range_text, st.integers(0, 1 << 20))
def test_range_replies_are_well_formed(header: str, size: int) -> None:
    blob = Blob("k" * 64, Path("/nonexistent/never-read"), size)
    if "," in header:
        return  # several ranges go to Starlette's FileResponse (tested over HTTP)
    answer = reply("HEAD", blob, header, None)  # HEAD: headers only, no file read
    assert answer.status in (200, 206, 416)
    if answer.status == 416:
        assert answer.headers["content-range"] == f"bytes */{size}"
    elif answer.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", answer.headers["content-range"])
        assert match is not None
        first, last, total = map(int, match.groups())
        assert 0 <= first <= last < size == total
        assert int(answer.headers["content-length"]) == last - first + 1
    else:
        assert int(answer.headers["content-length"]) == size
