"""The server's settings: one frozen record, passed to uvicorn workers through the environment."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SETTINGS_ENV = "OTAKIT_SERVER_SETTINGS"
DEFAULT_URL_DAYS = 1


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path
    database_url: str  # async SQLAlchemy URL
    blob_url: str | None = None
    max_upload: int = 512 * 1024 * 1024
    url_days: float = DEFAULT_URL_DAYS  # lifetime of signed download URLs in job documents
    direct_downloads: bool = False  # hand out S3 pre-signed URLs instead of the server's own
    rollout_interval: float = 5.0  # seconds between background rollout evaluations; 0: off
    history_per_device: int = 200  # status reports kept per device (the newest)
    history_days: float = 90  # status reports older than this are deleted
    anonymous_history: int = 1000  # reports kept from devices that do not identify themselves
    api_docs: bool = False  # serve the interactive API pages at /docs (scripts from a CDN)
    pool_size: int = 10  # database connections per worker (as many again for bursts)
    pool_timeout: float = 10.0  # seconds a request waits for a connection before 503
    statement_timeout: float = 30.0  # PostgreSQL: seconds before a statement is cancelled; 0: none
    ddi_poll: int = 300  # seconds hawkBit (DDI) clients are told to wait between polls
    # binary deltas (service/deltas.py): the compression they are made with; offered only when
    # at least this many times smaller than the image; background makers per server process
    # (0: none made, queued rows wait); images larger than this get none (memory: both images)
    delta_compression: str = "lzma"
    delta_min_ratio: float = 2.0
    delta_workers: int = 1
    delta_max_image: int = 16 * 1024 * 1024

    def to_env(self) -> str:
        data = asdict(self)
        data["data_dir"] = str(self.data_dir)
        return json.dumps(data)

    @classmethod
    def from_env(cls) -> ServerSettings:
        data: dict[str, Any] = json.loads(os.environ[SETTINGS_ENV])
        data["data_dir"] = Path(data["data_dir"])
        return cls(**data)
