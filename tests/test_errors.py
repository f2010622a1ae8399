"""The error hierarchy: stable, unique codes; agent names from the original middleware."""

from __future__ import annotations

import importlib
import pkgutil
import re

import otakit
from otakit import errors

# protocols.md §8: the original middleware's error names.
ORIGINAL_NAMES = set(
    [
        "UNSUPPORTED",
        "GENERAL",
        "BADARG",
        "OUT_OF_MEMORY",
        "ALREADY_STARTED",
        "MQTT_INIT",
        "OPEN_STORAGE",
        "READ_STORAGE",
        "WRITE_STORAGE",
        "CLOSE_STORAGE",
        "CONNECT",
        "DISCONNECT",
        "REDIRECT",
        "SERVER_DROPPED",
        "MQTT_SUBSCRIBE",
        "MQTT_PUBLISH",
        "GET_JOB",
        "GET_DATA",
        "NOT_A_HEADER",
        "NOT_A_JOB_DOC",
        "MALFORMED_JOB_DOC",
        "WRONG_BOARD",
        "INVALID_VERSION",
        "VERIFY",
        "SENDING_RESULT",
        "APP_RETURNED_STOP",
        "APP_EXCEEDED_RETRIES",
        "TRANSPORT_UNSUPPORTED",
        "NO_IMAGE_INFO",
    ]
)


def _all_errors() -> list[type[errors.OtakitError]]:
    """Every OtakitError subclass in otakit, wherever it is defined (every module is imported,
    so the result does not depend on what other tests imported first)."""
    for module in pkgutil.walk_packages(otakit.__path__, "otakit."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found = [errors.OtakitError]
    for cls in found:
        found.extend(cls.__subclasses__())
    return found


def test_codes_are_unique_and_stable_looking() -> None:
    classes = _all_errors()
    assert len(classes) > 20
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), codes
    for cls in classes:
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", cls.code), cls
        assert cls.agent_error in ORIGINAL_NAMES, cls
        assert cls.exit_status in (errors.EXIT_FAILED, errors.EXIT_USAGE), cls


def test_error_carries_message_and_value() -> None:
    exc = errors.HashMismatchError("image changed", value="ab12")
    assert str(exc) == "image changed"
    assert exc.value == "ab12"
    assert exc.code == "HASH_MISMATCH"
    assert exc.agent_error == "VERIFY"
    assert isinstance(exc, errors.VerificationError)
    assert isinstance(exc, errors.ImageError)
