"""Random and mutated images must only ever raise otakit errors, never struct/Index errors."""

from __future__ import annotations

import contextlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from otakit.errors import OtakitError
from otakit.image.header import ImageVersion
from otakit.image.info import inspect_image
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.image.verify import verify_image

KEY = SigningKey.generate("ed25519")
OTHER = SigningKey.generate("ecdsa-p256").public_key
SEED = sign_image(
    os.urandom(600),
    KEY,
    SignOptions(
        ImageVersion(1, 2, 3), pad_header=True, security_counter=3, slot_size=0x1000, pad=True
    ),
)
# the image part of SEED is where mutations matter; the rest is trailer padding
SEED_END = inspect_image(SEED).layout.end


def _check(data: bytes) -> None:
    for action in (
        lambda: verify_image(data, [KEY.public_key, OTHER]),
        lambda: verify_image(data),
        lambda: inspect_image(data).to_dict(),
    ):
        with contextlib.suppress(OtakitError):
            action()


@settings(max_examples=300)
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@settings(max_examples=300)
@given(st.binary(max_size=64), st.binary(min_size=32, max_size=64))
def test_random_bytes_behind_a_valid_magic(tail: bytes, head: bytes) -> None:
    _check(SEED[:4] + head[4:] + tail)


@settings(max_examples=500)
@given(
    st.lists(st.tuples(st.integers(0, SEED_END - 1), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, len(SEED)),
)
def test_mutated_images(mutations: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEED)
    for offset, value in mutations:
        data[offset] = value
    mutated = bytes(data)
    _check(mutated[:cut])
    _check(mutated)
    if mutated[:SEED_END] != SEED[:SEED_END]:
        # a changed image never verifies under the signing key
        try:
            verify_image(mutated, [KEY.public_key])
        except OtakitError:
            return
        raise AssertionError("a mutated image verified")
