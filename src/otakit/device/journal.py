"""The resume journal: what is being downloaded and how many bytes of it are durable.

A small JSON record replaced atomically (temporary file, fsync, rename) after the bytes it counts
have been made durable in the storage target. After a crash, ``kill -9`` or a power cut, the
next attempt continues from ``durable``: at most the one range in flight is fetched again. A
journal that cannot be read is treated as absent (the download starts over): it never stops a
device from updating.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from otakit.files import write_atomic


@dataclass(frozen=True, slots=True)
class Download:
    """What is downloaded: enough to tell the same image from another one."""

    source: str  # URL or server path of the file
    size: int  # total bytes (from Content-Range)
    version: str = ""  # as announced by the job ("" in the direct flow)
    etag: str | None = None  # the server's entity tag (the SHA-256 on otakit servers)
    sha256: str | None = None  # when the job says it (gateway model)

    def same_image(self, other: Download) -> bool:
        """Whether a partial download of ``other`` can be continued as this one."""
        if self.source != other.source or self.size != other.size:
            return False
        if self.etag and other.etag and self.etag != other.etag:
            return False
        if self.sha256 and other.sha256 and self.sha256.lower() != other.sha256.lower():
            return False
        return self.version == other.version


@dataclass(frozen=True, slots=True)
class JournalRecord:
    download: Download
    durable: int  # bytes at the start of the image that are safely stored
    # the state of a TAR package's demultiplexer at ``durable``
    # (otakit.device.core.package.PackageStream.to_dict); None for a single image
    package: dict[str, Any] | None = None


class Journal:
    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> JournalRecord | None:
        try:
            data = json.loads(self.path.read_bytes())
            package = data.get("package")  # absent in journals of single images and older ones
            if package is not None and not isinstance(package, dict):
                return None
            record = JournalRecord(Download(**data["download"]), int(data["durable"]), package)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if not 0 <= record.durable <= record.download.size:
            return None
        return record

    def save(self, record: JournalRecord) -> None:
        data: dict[str, Any] = {"download": asdict(record.download), "durable": record.durable}
        if record.package is not None:
            data["package"] = record.package
        write_atomic(self.path, json.dumps(data).encode())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
