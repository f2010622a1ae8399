"""SMP (mcumgr) on a device: the image and OS management a Zephyr application answers.

An SMP host (``smpclient``, ``smpmgr``, ``mcumgr``, nRF Connect Device Manager) pushes a signed
image over UDP or a serial console, marks it for test, resets the device and confirms it. This
module is the device's side of that conversation, on the device parts of otakit: the secondary
slot is written through :class:`~otakit.device.storage.SlotStorage` (verification and the resume
journal included) and the requests end up as the trailer writes of
:class:`~otakit.device.bootloader.Bootloader`.

Messages are the ``smp`` package's models; the 8-byte header and the CBOR body follow the SMP
specification (Zephyr's ``subsys/mgmt/mcumgr``). What is answered:

=====  ===========================  ===========================================================
group  command                      what it does here
=====  ===========================  ===========================================================
OS     0 echo                       echoes ``d``
OS     5 reset                      answers, then runs the bootloader (swap, revert...)
OS     6 MCUmgr parameters          ``buf_size``/``buf_count`` (the first request of a client)
OS     7 application info           uname-like text (``format`` letters ``snrvbmpioa``)
OS     8 bootloader info            ``MCUboot``; query ``mode``: swap/overwrite, no-downgrade
IMG    0 state read                 both slots of every image: version, hash, flags
IMG    0 state write                test (``hash``), permanent (``hash`` + ``confirm``),
                                    confirm the running image (``confirm`` alone); marking
                                    the secondary slot needs a finished upload that verifies
IMG    1 upload                     resumable write of the secondary slot, verified at the end
IMG    5 erase                      erases a secondary slot (``slot``, default 1)
=====  ===========================  ===========================================================

Anything else is answered ``rc`` 8 (``MGMT_ERR.ENOTSUP``); a frame that cannot be parsed is
answered ``rc`` 3 (``EINVAL``) when its header can be read and ignored when it cannot (shorter
than a header, or itself a response). Errors of a group are returned as SMP version 2 ``err``
maps (``{"err": {"group": 1, "rc": IMG_MGMT_ERR}}``) to version 2 requests and translated to
``MGMT_ERR`` codes, with the reason in ``rsn``, for version 1 requests, as Zephyr does.

Upload, as Zephyr's ``img_mgmt`` does it:

- the first packet (``off`` 0) carries ``len`` and optionally ``sha`` (SHA-256 of the whole file)
  and ``upgrade``. It erases the secondary slot, unless ``sha`` and ``len`` match the upload the
  journal records, in which case the answer is the durable offset and the client continues
  from there (the journal survives the server or the device restarting). When the packet holds
  the image header, an image that is not newer than the running one (the rule below) is
  refused at once, before anything is erased;
- every packet is written, made durable and journalled before it is acknowledged with the next
  expected ``off``; a packet at another offset is answered with the expected one;
- only the signed part of the file is written: bytes in the slot's trailer area (an ``imgtool
  --pad`` file's trailer) are kept in RAM for the SHA-256 and never reach flash, so the upload
  itself never requests anything;
- after the last byte the file's SHA-256 is compared with ``sha`` and the image is verified
  (hash, signature by a trusted key, newer than the running image unless the device allows
  downgrades and ``upgrade`` is not set, a security counter not lower than the running image's
  whatever the downgrade setting, nothing but erased bytes after the TLVs). A failure erases
  the slot and is answered with an error (see :data:`IMAGE_ERRORS`); success is answered
  ``off`` = ``len`` and ``match: true``.

A state write that marks a secondary slot (test, or ``hash`` + ``confirm``) is refused with
``MGMT_ERR.EBADSTATE`` (and the reason in ``rsn``) while the slot's upload is in progress or
incomplete (the journal records it, across restarts), or when its image does not verify as an
upload's would: nothing is written to the trailer. Zephyr leaves those checks to MCUboot at the
next reset; here the request itself is refused, so a host learns at once.

The secondary slot that holds the image a revert needs (the running image is on test) is not
uploaded to nor erased (``NO_FREE_SLOT``): confirm or reset first.

Transports: :func:`open_udp` (one datagram is one SMP message, as Zephyr's UDP transport; port
1337 by default) and :class:`PtyConsole`, Zephyr's "SMP over console" framing (base64 lines,
``smp.packet``) on a pseudo-terminal. Both run on an asyncio loop and call
:meth:`SmpServer.handle` for each message, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import struct
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeVar, cast

import cbor2
from pydantic import ValidationError
from smp import error as smperr
from smp import header as smphdr
from smp import image_management as smpimg
from smp import message as smpmsg
from smp import os_management as smpos
from smp import packet as smppacket
from smp.exceptions import SMPException

from otakit import __version__
from otakit.device.bootloader import Bootloader, ImageStatus, Strategy
from otakit.device.journal import Download, Journal
from otakit.device.slot import FlashArea
from otakit.device.storage import SlotStorage
from otakit.errors import (
    BadMagicError,
    DowngradeError,
    FlashError,
    HashMismatchError,
    ImageFormatError,
    ImageTooLargeError,
    OtakitError,
    TlvError,
    TrailingDataError,
    TruncatedImageError,
    VerificationError,
)
from otakit.image.header import HEADER_SIZE, ImageFlags, ImageHeader, ImageVersion
from otakit.image.layout import ImageLayout, read_layout
from otakit.image.tlv import HASH_TLVS
from otakit.protocol.version import FirmwareVersion

# MCUboot's enum mcuboot_mode (bootutil/boot_status.h), what os_mgmt's bootloader info reports;
# Infineon's swap-status is swap-using-scratch with its progress kept in a status partition.
_MCUBOOT_MODES = {
    Strategy.SWAP_SCRATCH: 1,
    Strategy.OVERWRITE: 2,
    Strategy.SWAP_MOVE: 3,
    Strategy.SWAP_OFFSET: 9,
    Strategy.SWAP_STATUS: 1,
}
log = logging.getLogger("otakit.smp")

DEFAULT_UDP_PORT = 1337  # Zephyr's CONFIG_MCUMGR_TRANSPORT_UDP_PORT
# One SMP message per datagram: a 1500-byte Ethernet MTU minus the IPv4 and UDP headers, so an
# upload packet filled to the buffer (as smpclient does) is never fragmented.
UDP_BUF_SIZE = 1500 - 20 - 8

Group = smphdr.GroupId
Op = smphdr.OP
MGMT_ERR = smperr.MGMT_ERR
IMG_ERR = smpimg.IMG_MGMT_ERR
OS_ERR = smpos.OS_MGMT_RET_RC


@dataclass(frozen=True)
class SmpConfig:
    """What the device says about itself."""

    buf_size: int = UDP_BUF_SIZE  # MCUmgr parameters: one SMP message, header included
    buf_count: int = 1
    node_name: str = "otakit"  # application info "n" (a simulated device's serial)
    board: str = "otakit-sim"  # application info "i" (hardware platform)


@dataclass(frozen=True)
class Reply:
    """The answer to one request, and what to do once it is on its way (a reset)."""

    frame: bytes
    after: Callable[[], None] | None = None


# --- errors ------------------------------------------------------------------------------------

# What an upload or a state write that otakit refuses is answered (SMP version 2), most
# specific class first. The reason itself (the otakit error code and sentence) is logged and,
# for SMP version 1 requests, sent as "rsn".
IMAGE_ERRORS: tuple[tuple[type[OtakitError], IMG_ERR], ...] = (
    (BadMagicError, IMG_ERR.INVALID_IMAGE_HEADER_MAGIC),
    (ImageTooLargeError, IMG_ERR.INVALID_IMAGE_TOO_LARGE),
    (TruncatedImageError, IMG_ERR.INVALID_LENGTH),
    (TrailingDataError, IMG_ERR.INVALID_LENGTH),  # the file is longer than its image
    (TlvError, IMG_ERR.INVALID_TLV),
    (ImageFormatError, IMG_ERR.INVALID_IMAGE_HEADER),
    (HashMismatchError, IMG_ERR.INVALID_HASH),
    (DowngradeError, IMG_ERR.CURRENT_VERSION_IS_NEWER),
    # signature missing, not by a trusted key, or not verifying; no hash TLV
    (VerificationError, IMG_ERR.INVALID_TLV),
    (FlashError, IMG_ERR.FLASH_WRITE_FAILED),
)

# Zephyr's translation of group errors for SMP version 1 clients (img_mgmt_translate_error_code,
# os_mgmt_translate_error_code); anything else is EUNKNOWN.
_IMG_V1 = {
    IMG_ERR.NO_IMAGE: MGMT_ERR.ENOENT,
    IMG_ERR.NO_TLVS: MGMT_ERR.ENOENT,
    IMG_ERR.NO_FREE_SLOT: MGMT_ERR.EBADSTATE,
    IMG_ERR.CURRENT_VERSION_IS_NEWER: MGMT_ERR.EBADSTATE,
    IMG_ERR.IMAGE_ALREADY_PENDING: MGMT_ERR.EBADSTATE,
    IMG_ERR.NO_FREE_MEMORY: MGMT_ERR.ENOMEM,
    IMG_ERR.INVALID_SLOT: MGMT_ERR.EINVAL,
    IMG_ERR.INVALID_PAGE_OFFSET: MGMT_ERR.EINVAL,
    IMG_ERR.INVALID_OFFSET: MGMT_ERR.EINVAL,
    IMG_ERR.INVALID_LENGTH: MGMT_ERR.EINVAL,
    IMG_ERR.INVALID_IMAGE_HEADER: MGMT_ERR.EINVAL,
    IMG_ERR.INVALID_HASH: MGMT_ERR.EINVAL,
    IMG_ERR.INVALID_FLASH_ADDRESS: MGMT_ERR.EINVAL,
}
_OS_V1 = {
    OS_ERR.INVALID_FORMAT: MGMT_ERR.EINVAL,
    OS_ERR.QUERY_YIELDS_NO_ANSWER: MGMT_ERR.ENOENT,
    OS_ERR.RTC_NOT_SET: MGMT_ERR.ENOENT,
}


class _Refused(Exception):
    """A request answered with an error. ``group`` None: an SMP error (``MGMT_ERR``)."""

    def __init__(self, rc: IntEnum, *, group: Group | None = None, reason: str = "") -> None:
        super().__init__(reason or rc.name)
        self.rc = rc
        self.group = group
        self.reason = reason

    def body(self, version: int) -> dict[str, Any]:
        if self.group is not None and version == smphdr.Version.V2:
            return {"err": {"group": int(self.group), "rc": int(self.rc)}}
        rc = self.rc
        if self.group is not None:
            table: Mapping[Any, MGMT_ERR] = (
                _IMG_V1 if self.group == Group.IMAGE_MANAGEMENT else _OS_V1
            )
            rc = table.get(self.rc, MGMT_ERR.EUNKNOWN)
        body: dict[str, Any] = {"rc": int(rc)}
        if self.reason:
            body["rsn"] = self.reason
        return body


def _image_error(rc: IMG_ERR, reason: str = "") -> _Refused:
    return _Refused(rc, group=Group.IMAGE_MANAGEMENT, reason=reason)


def _refusal(exc: OtakitError) -> _Refused:
    rc = next((rc for kind, rc in IMAGE_ERRORS if isinstance(exc, kind)), IMG_ERR.UNKNOWN)
    return _image_error(rc, f"[{exc.code}] {exc.message}")


# --- the envelope ------------------------------------------------------------------------------

# The 8-byte SMP header of smp.header.Header (op and version bits, flags, length, group,
# sequence, command), read here without smp's command-id check so that a command this device
# does not know can still be answered ENOTSUP.
_HEADER = struct.Struct("!BBHHBB")
_META_FIELDS = frozenset({"header", "version", "sequence", "smp_data"})


@dataclass(frozen=True)
class _Envelope:
    op: int
    version: int
    length: int
    group: int
    sequence: int
    command: int

    @classmethod
    def read(cls, frame: bytes) -> _Envelope | None:
        if len(frame) < _HEADER.size:
            return None
        first, _flags, length, group, sequence, command = _HEADER.unpack_from(frame)
        return cls(first & 0b111, (first >> 3) & 0b11, length, group, sequence, command)

    def answer(self, body: Mapping[str, Any], *, version: int | None = None) -> bytes:
        """A response frame with ``body`` (errors: the smp models cannot frame them for
        commands they do not know)."""
        return self.wrap(cbor2.dumps(dict(body), canonical=True), version=version)

    def wrap(self, payload: bytes, *, version: int | None = None) -> bytes:
        """The response frame to this request with the CBOR ``payload``."""
        version = self.version if version is None else version
        first = (version << 3) | (self.op + 1)
        return (
            _HEADER.pack(first, 0, len(payload), self.group, self.sequence, self.command) + payload
        )


R = TypeVar("R", bound=smpmsg.Request)


def _parse(model: type[R], frame: bytes, body: dict[str, Any]) -> R:
    """The request as its smp model. Keys the model does not know are ignored (a newer
    client's), as Zephyr's decoder does. Raises ValidationError or SMPException."""
    known = set(model.model_fields) - _META_FIELDS
    fields = {k: v for k, v in body.items() if k in known}
    header = smphdr.Header.loads(frame[: _HEADER.size])
    return model(header=header, version=header.version, smp_data=frame, **fields)


# --- the server --------------------------------------------------------------------------------


@dataclass
class _Upload:
    """The upload in progress (RAM state: a reset or a restart forgets it; the journal not)."""

    image: int
    storage: SlotStorage
    download: Download
    sha: bytes | None
    offset: int  # the next byte expected; everything before it is durable


_Handler = Callable[[Any], smpmsg.Response]


class SmpServer:
    """Answers SMP requests for a device whose flash ``bootloader`` works on.

    ``journal(image)`` is the resume journal of image ``image``'s secondary slot (share it with
    any other writer of that slot, e.g. the OTA agent); ``reset`` reboots the device (runs the
    bootloader). :meth:`handle` never raises: whatever goes wrong becomes an error answer.
    """

    def __init__(
        self,
        bootloader: Bootloader,
        *,
        journal: Callable[[int], Journal],
        reset: Callable[[], object],
        config: SmpConfig | None = None,
    ) -> None:
        self.boot = bootloader
        self.config = config or SmpConfig()
        self._journal = journal
        self._reset = reset
        self._upload: _Upload | None = None
        self._after: Callable[[], None] | None = None
        img, os_ = smphdr.CommandId.ImageManagement, smphdr.CommandId.OSManagement
        self._routes: dict[tuple[int, int, int], tuple[type[smpmsg.Request], _Handler]] = {
            (Group.OS_MANAGEMENT, os_.ECHO, Op.WRITE): (smpos.EchoWriteRequest, self._echo),
            (Group.OS_MANAGEMENT, os_.RESET, Op.WRITE): (smpos.ResetWriteRequest, self._os_reset),
            (Group.OS_MANAGEMENT, os_.MCUMGR_PARAMETERS, Op.READ): (
                smpos.MCUMgrParametersReadRequest,
                self._parameters,
            ),
            (Group.OS_MANAGEMENT, os_.OS_APPLICATION_INFO, Op.READ): (
                smpos.OSApplicationInfoReadRequest,
                self._application_info,
            ),
            (Group.OS_MANAGEMENT, os_.BOOTLOADER_INFO, Op.READ): (
                smpos.BootloaderInformationReadRequest,
                self._bootloader_info,
            ),
            (Group.IMAGE_MANAGEMENT, img.STATE, Op.READ): (
                smpimg.ImageStatesReadRequest,
                self._state_read,
            ),
            (Group.IMAGE_MANAGEMENT, img.STATE, Op.WRITE): (
                smpimg.ImageStatesWriteRequest,
                self._state_write,
            ),
            (Group.IMAGE_MANAGEMENT, img.UPLOAD, Op.WRITE): (
                smpimg.ImageUploadWriteRequest,
                self._image_upload,
            ),
            (Group.IMAGE_MANAGEMENT, img.ERASE, Op.WRITE): (
                smpimg.ImageEraseRequest,
                self._image_erase,
            ),
        }

    # --- dispatch ------------------------------------------------------------------------------

    def handle(self, frame: bytes) -> Reply | None:
        """The answer to one SMP message (header and CBOR body), None to stay silent."""
        envelope = _Envelope.read(frame)
        if envelope is None or envelope.op not in (Op.READ, Op.WRITE):
            return None  # not a request (too short, a response, or a reserved op)
        self._after = None
        try:
            response = self._dispatch(envelope, bytes(frame))
        except _Refused as refused:
            if refused.reason:
                log.warning("refused %s: %s", _command_name(envelope), refused.reason)
            version = min(envelope.version, smphdr.Version.V2)
            return Reply(envelope.answer(refused.body(version), version=version))
        except Exception:  # a bug or an I/O error must not stop the device from answering
            log.exception("failed to handle %s", _command_name(envelope))
            return Reply(envelope.answer({"rc": int(MGMT_ERR.EUNKNOWN)}))
        # the header is the request's (op + 1, same sequence): the smp models give the body only
        # (its ImageStatesWriteResponse would say READ_RSP)
        return Reply(envelope.wrap(response.BYTES[_HEADER.size :]), self._after)

    def _dispatch(self, envelope: _Envelope, frame: bytes) -> smpmsg.Response:
        if envelope.version > smphdr.Version.V2:
            raise _Refused(MGMT_ERR.UNSUPPORTED_TOO_NEW)
        route = self._routes.get((envelope.group, envelope.command, envelope.op))
        if route is None:
            raise _Refused(MGMT_ERR.ENOTSUP)
        if len(frame) != _HEADER.size + envelope.length:
            raise _Refused(
                MGMT_ERR.EINVAL,
                reason=f"the frame is {len(frame)} bytes, its header says "
                f"{_HEADER.size + envelope.length}",
            )
        try:
            body = cbor2.loads(frame[_HEADER.size :]) if envelope.length else {}
        except Exception:  # cbor2 raises several kinds for malformed input
            raise _Refused(MGMT_ERR.EINVAL, reason="the body is not valid CBOR") from None
        if not isinstance(body, dict):
            raise _Refused(MGMT_ERR.EINVAL, reason="the body is not a CBOR map")
        model, handler = route
        try:
            request = _parse(model, frame, body)
        except (ValidationError, SMPException, ValueError, TypeError) as exc:
            raise _Refused(MGMT_ERR.EINVAL, reason=f"malformed request: {exc}") from None
        return handler(request)

    # --- OS management -------------------------------------------------------------------------

    def _echo(self, request: smpos.EchoWriteRequest) -> smpmsg.Response:
        return smpos.EchoWriteResponse(r=request.d)

    def _os_reset(self, request: smpos.ResetWriteRequest) -> smpmsg.Response:
        if request.boot_mode not in (None, smpos.BootMode.NORMAL):
            raise _Refused(MGMT_ERR.ENOTSUP, reason="only a normal boot can be requested")
        self._after = self._reboot
        return smpos.ResetWriteResponse()

    def _reboot(self) -> None:
        self._upload = None  # RAM state; the journal remains
        self.boot.flash.flush()
        log.info("reset: running the bootloader")
        self._reset()

    def _parameters(self, request: smpos.MCUMgrParametersReadRequest) -> smpmsg.Response:
        return smpos.MCUMgrParametersReadResponse(
            buf_size=self.config.buf_size,
            buf_count=self.config.buf_count,
        )

    def _application_info(self, request: smpos.OSApplicationInfoReadRequest) -> smpmsg.Response:
        running = self._running(0)
        fields = {
            "s": "otakit",  # kernel name
            "n": self.config.node_name,
            "r": __version__,  # kernel release
            "v": "none" if running is None else _version_text(running),  # the application
            "m": "sim",  # machine
            "p": "sim",  # processor
            "i": self.config.board,  # hardware platform
            "o": "otakit",  # operating system
        }
        wanted = request.format or "s"
        unknown = set(wanted) - set(fields) - {"a", "b"}
        if unknown:
            raise _Refused(
                OS_ERR.INVALID_FORMAT,
                group=Group.OS_MANAGEMENT,
                reason=f"unknown format letters {''.join(sorted(unknown))!r}",
            )
        chosen = [v for k, v in fields.items() if "a" in wanted or k in wanted]
        return smpos.OSApplicationInfoReadResponse(output=" ".join(chosen))

    def _bootloader_info(self, request: smpos.BootloaderInformationReadRequest) -> smpmsg.Response:
        if request.query is None:
            return smpos.BootloaderInformationReadResponse(bootloader="MCUboot")
        if request.query != "mode":
            raise _Refused(
                OS_ERR.QUERY_YIELDS_NO_ANSWER,
                group=Group.OS_MANAGEMENT,
                reason=f"unknown bootloader query {request.query!r}",
            )
        mode = _MCUBOOT_MODES[Strategy(self.boot.map.strategy)]
        return smpos.BootloaderInformationReadResponse(
            bootloader="MCUboot",
            response={"mode": mode, "no-downgrade": not self.boot.config.allow_downgrade},
        )

    # --- image management: state ---------------------------------------------------------------

    def _state_read(self, request: smpimg.ImageStatesReadRequest) -> smpmsg.Response:
        return smpimg.ImageStatesReadResponse(images=self._states(), splitStatus=0)

    def _states(self) -> list[smpimg.ImageState]:
        """Zephyr's img_mgmt_state_read: the running (primary) slot is active and, unless it
        reverts at the next boot, confirmed; the other slot is pending (and permanent), or
        confirmed when it holds the image a revert brings back. Empty slots are not listed."""
        states = []
        for status in self.boot.status():
            next_boot = status.pending
            primary = {"active": True, "confirmed": next_boot not in ("revert", "resume")}
            secondary = {
                "pending": next_boot in ("test", "permanent"),
                "permanent": next_boot == "permanent",
                "confirmed": next_boot == "revert",
            }
            for slot, flags in ((0, primary), (1, secondary)):
                layout = self._layout(status.image, slot)
                if layout is None:
                    continue
                header = layout.header
                hash_tlv = next((t for t in layout.tlvs if t.kind in HASH_TLVS), None)
                states.append(
                    smpimg.ImageState(
                        image=status.image,
                        slot=slot,
                        version=_version_text(header.version),
                        hash=None if hash_tlv is None else hash_tlv.value,
                        bootable=not header.flags & ImageFlags.NON_BOOTABLE,
                        pending=flags.get("pending", False),
                        confirmed=flags.get("confirmed", False),
                        active=flags.get("active", False),
                        permanent=flags.get("permanent", False),
                    )
                )
        return states

    def _slot(self, image: int, slot: int) -> FlashArea:
        """Where slot ``slot``'s image starts (swap-offset: one sector into the secondary, as
        Zephyr's img_mgmt reads it)."""
        return self.boot.primary(image) if slot == 0 else self.boot.update_area(image)

    def _layout(self, image: int, slot: int) -> ImageLayout | None:
        try:
            return read_layout(
                self._slot(image, slot), max_size=self.boot.map.max_image_size(image)
            )
        except ImageFormatError:
            return None

    def _running(self, image: int) -> ImageVersion | None:
        layout = self._layout(image, 0)
        return None if layout is None else layout.header.version

    def _state_write(self, request: smpimg.ImageStatesWriteRequest) -> smpmsg.Response:
        if not request.hash:
            if not request.confirm:
                raise _image_error(IMG_ERR.INVALID_HASH, "a test needs the image's hash")
            image, slot = 0, 0  # confirm the running image
        elif len(request.hash) not in (32, 48, 64):
            raise _image_error(IMG_ERR.INVALID_HASH, f"a {len(request.hash)}-byte hash")
        else:
            found = self._find(request.hash)
            if found is None:
                raise _image_error(
                    IMG_ERR.HASH_NOT_FOUND, f"no image has the hash {request.hash.hex()}"
                )
            image, slot = found
        status = self.boot.status()[self.boot.map.images.index(image)]
        if self._set_next_boot(status, slot, confirm=request.confirm):
            self.boot.flash.flush()
        return smpimg.ImageStatesWriteResponse(images=self._states(), splitStatus=0)

    def _find(self, digest: bytes) -> tuple[int, int] | None:
        for image in self.boot.map.images:
            for slot in (0, 1):
                layout = self._layout(image, slot)
                if layout is not None and any(
                    t.kind in HASH_TLVS and t.value == digest for t in layout.tlvs
                ):
                    return image, slot
        return None

    def _set_next_boot(self, status: ImageStatus, slot: int, *, confirm: bool) -> bool:
        """Zephyr's img_mgmt_set_next_boot_slot on the bootloader's view of the image pair;
        returns whether anything was written."""
        image, next_boot = status.image, status.pending
        pending = _image_error(
            IMG_ERR.IMAGE_ALREADY_PENDING, f"image {image}: next boot {next_boot}"
        )
        if next_boot == "resume":
            raise pending  # an upgrade was interrupted; the bootloader finishes it first
        if not confirm and slot == 0:
            raise _image_error(
                IMG_ERR.IMAGE_SETTING_TEST_TO_ACTIVE_DENIED, "the running image cannot be tested"
            )
        if next_boot == "test":
            if not confirm and slot == 1:
                return False  # already set for test
            raise pending
        if next_boot in ("none", "permanent"):
            next_slot = 1 if next_boot == "permanent" else 0
            if confirm and slot == next_slot:
                return False
            if slot == 0 or (not confirm and slot == next_slot):
                raise pending
        if next_boot == "revert":
            if confirm and slot == 1:
                return False  # the previous image is already confirmed
            if not confirm:
                raise pending
        if slot == 0:
            log.info("image %d: running image confirmed", image)
            return self.boot.confirm(image)
        storage = self._markable(image)
        storage.set_pending(permanent=confirm)  # journal cleared too
        log.info("image %d: pending (%s)", image, "permanent" if confirm else "test")
        return True

    def _markable(self, image: int) -> SlotStorage:
        """The storage of image ``image``'s secondary slot, if what it holds may be marked
        pending: its upload is complete and it verifies as after an upload (hash, signature by
        a trusted key, newer unless downgrades are allowed, security counter, nothing unsigned
        after the TLVs). Refused with ``MGMT_ERR.EBADSTATE`` otherwise, before anything is
        written (Zephyr's answer when a slot's state does not allow a request)."""
        upload = self._upload
        if upload is not None and upload.image == image:
            raise _Refused(
                MGMT_ERR.EBADSTATE,
                reason=f"image {image}: an upload is in progress ({upload.offset} of "
                f"{upload.download.size} bytes); finish it before marking the image",
            )
        record = self._journal(image).load()
        if record is not None:
            raise _Refused(
                MGMT_ERR.EBADSTATE,
                reason=f"image {image}: the upload to the secondary slot is incomplete "
                f"({record.durable} of {record.download.size} bytes); finish it first",
            )
        storage = self._storage(image)
        try:
            storage.verify()
        except OtakitError as exc:
            raise _Refused(MGMT_ERR.EBADSTATE, reason=f"[{exc.code}] {exc.message}") from None
        return storage

    # --- image management: upload and erase ----------------------------------------------------

    def _storage(self, image: int, *, upgrade: bool = False) -> SlotStorage:
        running = self._running(image)
        return SlotStorage(
            self.boot,
            self._journal(image),
            self.boot.config.keys,
            current_version="0" if running is None else str(FirmwareVersion.from_image(running)),
            image=image,
            allow_downgrade=self.boot.config.allow_downgrade and not upgrade,
        )

    def _end_upload(self, image: int) -> None:
        if self._upload is not None and self._upload.image == image:
            self._upload = None

    def _check_free(self, image: int) -> None:
        """Zephyr's img_mgmt_slot_in_use for the secondary slot."""
        next_boot = self.boot.status()[self.boot.map.images.index(image)].pending
        if next_boot in ("revert", "resume"):
            raise _image_error(
                IMG_ERR.NO_FREE_SLOT,
                f"image {image}: the secondary slot holds the image the next boot "
                f"{'reverts to' if next_boot == 'revert' else 'swaps'}; confirm or reset first",
            )

    def _upload_response(
        self, env: _Envelope, request: smpmsg.Request, offset: int, match: bool | None = None
    ) -> smpmsg.Response:
        return smpimg.ImageUploadWriteResponse(off=offset, match=match)

    def _image_upload(self, request: smpimg.ImageUploadWriteRequest) -> smpmsg.Response:
        if request.off < 0:
            raise _image_error(IMG_ERR.INVALID_OFFSET, f"offset {request.off}")
        if request.off == 0:
            if request.len is None:
                raise _image_error(IMG_ERR.INVALID_LENGTH, "the first packet has no len")
            upload = self._start_upload(request)
        elif self._upload is None or request.off != self._upload.offset:
            # a packet out of order, a repeat, or of an upload this device forgot (it reset):
            # the answer is where to continue (0: start again)
            expected = 0 if self._upload is None else self._upload.offset
            return smpimg.ImageUploadWriteResponse(off=expected)
        else:
            upload = self._upload
            self._write(upload, request.data)
        if upload.offset < upload.download.size:
            return smpimg.ImageUploadWriteResponse(off=upload.offset)
        return smpimg.ImageUploadWriteResponse(off=upload.offset, match=self._finish(upload))

    def _start_upload(self, request: smpimg.ImageUploadWriteRequest) -> _Upload:
        image = request.image or 0
        size = request.len or 0
        if image not in self.boot.map.images:
            raise _image_error(IMG_ERR.INVALID_SLOT, f"this device has no image {image}")
        if size < HEADER_SIZE:
            raise _image_error(IMG_ERR.INVALID_IMAGE_HEADER, f"an image of {size} bytes")
        header = None
        if len(request.data) >= HEADER_SIZE:
            try:
                header = ImageHeader.unpack(request.data[:HEADER_SIZE])
            except OtakitError as exc:
                raise _refusal(exc) from None
        self._check_free(image)
        self._upload = None
        storage = self._storage(image, upgrade=bool(request.upgrade))
        if header is not None and not storage.allow_downgrade:
            # known from the first packet: refused before the slot is erased or a byte is sent
            version = FirmwareVersion.from_image(header.version)
            if not version > storage.current:
                raise _refusal(
                    DowngradeError(
                        f"the image is {version}, not newer than the running {storage.current}",
                        value=str(version),
                    )
                )
        sha = request.sha or None
        download = Download(
            # without a SHA-256 an upload cannot be told from another: never resumed
            source=f"smp:image-{image}" + ("" if sha else f":{uuid.uuid4().hex}"),
            size=size,
            sha256=None if sha is None else sha.hex(),
        )
        try:
            durable = storage.open(download)
        except OtakitError as exc:
            raise _refusal(exc) from None
        upload = _Upload(image, storage, download, sha, durable)
        if durable:
            log.info("image %d: upload resumed at byte %d of %d", image, durable, size)
        else:
            log.info("image %d: upload of %d bytes started", image, size)
            self._write(upload, request.data)
        self._upload = upload
        return upload

    def _write(self, upload: _Upload, data: bytes) -> None:
        end = upload.offset + len(data)
        if end > upload.download.size:
            self._upload = None
            raise _image_error(
                IMG_ERR.INVALID_IMAGE_DATA_OVERRUN,
                f"{end - upload.download.size} bytes past the announced {upload.download.size}",
            )
        if not data:
            return
        try:
            upload.storage.write(upload.offset, data)
            upload.storage.commit(end)  # durable and journalled before it is acknowledged
        except OtakitError as exc:
            self._upload = None
            raise _refusal(exc) from None
        upload.offset = end

    def _finish(self, upload: _Upload) -> bool | None:
        """Check the complete upload; returns ``match`` (None without a full SHA-256)."""
        self._upload = None
        storage = upload.storage
        match: bool | None = None
        try:
            if upload.sha is not None and len(upload.sha) == hashlib.sha256().digest_size:
                # the file's bytes as received, the trailer area's (never written) included
                digest = storage.sha256(upload.download.size)
                if digest != upload.sha:
                    raise HashMismatchError(
                        "the uploaded bytes do not match the SHA-256 the client announced",
                        value=digest.hex(),
                    )
                match = True
            version = storage.verify()
        except OtakitError as exc:
            storage.abort()  # leaves the slot erased and the journal empty
            raise _refusal(exc) from None
        storage.journal.clear()  # done: the same image uploaded again starts over
        log.info("image %d: upload complete, %s verified", upload.image, version)
        return match

    def _image_erase(self, request: smpimg.ImageEraseRequest) -> smpmsg.Response:
        number = 1 if request.slot is None else request.slot
        image, slot = divmod(number, 2)
        if number < 0 or image not in self.boot.map.images:
            raise _image_error(IMG_ERR.INVALID_SLOT, f"this device has no slot {number}")
        if slot == 0:
            raise _image_error(IMG_ERR.NO_FREE_SLOT, f"slot {number} holds the running image")
        self._check_free(image)
        self._end_upload(image)
        self._storage(image).abort()
        log.info("image %d: secondary slot erased", image)
        return smpimg.ImageEraseResponse()


def _version_text(version: ImageVersion) -> str:
    """As Zephyr's img_mgmt_ver_str: ``major.minor.revision``, ``.build`` when not 0."""
    text = f"{version.major}.{version.minor}.{version.revision}"
    return text if version.build == 0 else f"{text}.{version.build}"


def _command_name(env: _Envelope) -> str:
    """E.g. ``IMAGE_MANAGEMENT UPLOAD``, for the log."""
    commands: dict[int, type[IntEnum]] = {
        Group.OS_MANAGEMENT: smphdr.CommandId.OSManagement,
        Group.IMAGE_MANAGEMENT: smphdr.CommandId.ImageManagement,
    }
    try:
        group = Group(env.group).name
    except ValueError:
        return f"group {env.group} command {env.command}"
    try:
        return f"{group} {commands[env.group](env.command).name}"
    except (KeyError, ValueError):
        return f"{group} command {env.command}"


# --- transports --------------------------------------------------------------------------------


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, server: SmpServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self.server.handle(data)
        if reply is None or self.transport is None:
            return
        self.transport.sendto(reply.frame, addr)  # sent before a reset runs
        _run_after(reply)

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)  # e.g. ICMP port unreachable from a client that left


def _run_after(reply: Reply) -> None:
    if reply.after is None:
        return
    try:
        reply.after()
    except Exception:
        log.exception("the action after the reply failed")


async def open_udp(
    server: SmpServer, host: str = "127.0.0.1", port: int = DEFAULT_UDP_PORT
) -> asyncio.DatagramTransport:
    """Answer SMP datagrams on ``host``:``port`` (0: a free port; read it from
    ``transport.get_extra_info("sockname")``) until the returned transport is closed.

    Raises OSError when the address cannot be bound.
    """
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Datagrams(server), local_addr=(host, port)
    )
    return transport


class ConsoleFraming:
    """Zephyr's SMP over console (UART or shell): each message is base64 lines, the first
    starting with bytes 6 9, the next with 4 20 (``smp.packet``). Other lines (console text)
    are ignored, as is a message whose CRC or encoding is wrong."""

    LINE_LENGTH = 128

    def __init__(self, server: SmpServer, write: Callable[[bytes], None]) -> None:
        self.server = server
        self.write = write
        self._pending = bytearray()
        self._decoder: Any = None  # smp.packet.decode() generator while a message comes in

    def feed(self, data: bytes) -> None:
        self._pending += data
        while (end := self._pending.find(b"\n")) >= 0:
            line = bytes(self._pending[: end + 1])
            del self._pending[: end + 1]
            self._line(line)
        if len(self._pending) > 64 * 1024:  # a console that never ends a line
            self._pending.clear()

    def _line(self, line: bytes) -> None:
        if line.startswith(smppacket.START_DELIMITER):
            self._decoder = smppacket.decode()
            next(self._decoder)
        elif not line.startswith(smppacket.CONTINUE_DELIMITER) or self._decoder is None:
            return
        try:
            self._decoder.send(line)
        except StopIteration as done:
            self._decoder = None
            self._message(bytes(done.value))
        except Exception as exc:  # bad base64, CRC or delimiter
            self._decoder = None
            log.debug("console frame dropped: %s", exc)

    def _message(self, frame: bytes) -> None:
        reply = self.server.handle(frame)
        if reply is None:
            return
        self.write(b"".join(smppacket.encode(reply.frame, line_length=self.LINE_LENGTH)))
        _run_after(reply)


class PtyConsole:
    """SMP over console framing on a new pseudo-terminal (POSIX): point a serial SMP client at
    :attr:`path`. Reads and writes happen on the running asyncio loop."""

    def __init__(self, server: SmpServer) -> None:
        import tty

        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line editing, no newline translation
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._framing = ConsoleFraming(server, self._write)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._master, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("console read failed: %s", exc)
            return
        self._framing.feed(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._master, view)
            except BlockingIOError:
                log.warning("console output dropped: nobody reads %s", self.path)
                return
            view = view[written:]

    def close(self) -> None:
        with contextlib.suppress(ValueError, RuntimeError):
            self._loop.remove_reader(self._master)
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
