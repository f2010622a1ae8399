"""What the agent tells the application, with the original middleware's names (protocols.md §8).

Every state change is reported to the application's callback with a reason; the callback's
answer is obeyed: CONTINUE goes on, STOP ends this update attempt (``APP_RETURNED_STOP``),
APP_SUCCESS means the application did this step itself, APP_FAILED that it tried and failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    NOT_INITIALIZED = "NOT_INITIALIZED"
    EXITING = "EXITING"
    INITIALIZING = "INITIALIZING"
    AGENT_STARTED = "AGENT_STARTED"
    AGENT_WAITING = "AGENT_WAITING"
    START_UPDATE = "START_UPDATE"
    JOB_CONNECT = "JOB_CONNECT"
    JOB_DOWNLOAD = "JOB_DOWNLOAD"
    JOB_DISCONNECT = "JOB_DISCONNECT"
    JOB_PARSE = "JOB_PARSE"
    JOB_REDIRECT = "JOB_REDIRECT"
    STORAGE_OPEN = "STORAGE_OPEN"
    DATA_CONNECT = "DATA_CONNECT"
    DATA_DOWNLOAD = "DATA_DOWNLOAD"
    STORAGE_WRITE = "STORAGE_WRITE"
    DATA_DISCONNECT = "DATA_DISCONNECT"
    STORAGE_CLOSE = "STORAGE_CLOSE"
    VERIFY = "VERIFY"
    RESULT_REDIRECT = "RESULT_REDIRECT"
    RESULT_CONNECT = "RESULT_CONNECT"
    RESULT_SEND = "RESULT_SEND"
    RESULT_DISCONNECT = "RESULT_DISCONNECT"
    OTA_COMPLETE = "OTA_COMPLETE"


class Reason(StrEnum):
    STATE_CHANGE = "STATE_CHANGE"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"


class Answer(StrEnum):
    CONTINUE = "CONTINUE"
    STOP = "STOP"
    APP_SUCCESS = "APP_SUCCESS"
    APP_FAILED = "APP_FAILED"


@dataclass(frozen=True)
class Event:
    state: State
    reason: Reason
    error: str | None = None  # the original's error name on FAILURE (e.g. "VERIFY")
    message: str | None = None  # one human sentence
    percentage: int | None = None  # during STORAGE_WRITE
    bytes_done: int | None = None
    total: int | None = None


Callback = Callable[[Event], Answer | None]
