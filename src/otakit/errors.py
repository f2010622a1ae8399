"""The one exception hierarchy of otakit.

Every error otakit raises for bad input or a failed check is an :class:`OtakitError`. Each class
carries a stable ``code`` (what scripts and reports match on; never renamed) and an exit status
for the CLI. Where the original OTA middleware has a name for the failure (``VERIFY``,
``BADARG``, ``MALFORMED_JOB_DOC``...), :attr:`OtakitError.agent_error` gives it, so a device can
report failures with the names existing tools know.

The message is one human sentence; ``value`` is the offending value, when there is one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

# CLI exit statuses.
EXIT_FAILED = 1  # the command ran and the answer is "no" (invalid image, failed check)
EXIT_USAGE = 2  # the command could not run as asked (bad argument, unreadable input)


def causes(exc: BaseException, *, orig: bool = False) -> Iterator[BaseException]:
    """``exc``, then what it was raised from (``__cause__``, else ``__context__``), innermost
    last, each once; with ``orig``, a database driver's wrapped error (``orig``) comes first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        wrapped = getattr(current, "orig", None) if orig else None
        current = wrapped or current.__cause__ or current.__context__


class OtakitError(Exception):
    """Base of every otakit error."""

    code: ClassVar[str] = "GENERAL"
    agent_error: ClassVar[str] = "GENERAL"
    exit_status: ClassVar[int] = EXIT_FAILED

    def __init__(self, message: str, *, value: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.value = value

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


# --- usage -------------------------------------------------------------------------------------


class UsageError(OtakitError):
    """The caller asked for something that cannot be done as asked."""

    code = "BADARG"
    agent_error = "BADARG"
    exit_status = EXIT_USAGE


class InputFileError(UsageError):
    """An input file is missing or unreadable, or an output cannot be written."""

    code = "FILE"


class VersionFormatError(UsageError):
    """A version string does not have the expected form."""

    code = "BAD_VERSION"


class MissingExtraError(UsageError):
    """A command needs packages of an extra that is not installed (``otakit.extras``): the
    message names the extra and the pip command; ``value`` lists the missing modules."""

    code = "MISSING_EXTRA"


class HexFileError(InputFileError):
    """A ``.hex`` file is not valid Intel HEX (bad record, checksum, overlap), holds no data, or
    spans more address space than otakit reads; or a ``.hex`` output has no address."""

    code = "BAD_HEX"


# --- keys --------------------------------------------------------------------------------------


class CryptoKeyError(OtakitError):
    """A key cannot be loaded or used."""

    code = "KEY"
    exit_status = EXIT_USAGE


class KeyFormatError(CryptoKeyError):
    """The key file is not a PEM key otakit understands."""

    code = "KEY_FORMAT"


class UnsupportedKeyError(CryptoKeyError):
    """The key type or size is not supported for this operation."""

    code = "KEY_UNSUPPORTED"


class KeyPasswordError(CryptoKeyError):
    """The key is encrypted and the password is missing or wrong."""

    code = "KEY_PASSWORD"


# --- images ------------------------------------------------------------------------------------


class ImageError(OtakitError):
    """Base of every error about an MCUboot image."""

    code = "IMAGE"
    agent_error = "VERIFY"


class ImageFormatError(ImageError):
    """The bytes are not a well-formed MCUboot image."""

    code = "IMAGE_FORMAT"


class BadMagicError(ImageFormatError):
    """The image header or a TLV area does not start with its magic number."""

    code = "BAD_MAGIC"


class TruncatedImageError(ImageFormatError):
    """The image ends before the header, payload or TLV area it announces."""

    code = "TRUNCATED"


class TlvError(ImageFormatError):
    """A TLV area is malformed: entries overlap, overflow their area or are duplicated."""

    code = "BAD_TLV"


class ImageTooLargeError(ImageFormatError):
    """The image is larger than the slot or limit it must fit in."""

    code = "IMAGE_TOO_LARGE"


class TrailingDataError(ImageFormatError):
    """Bytes that are not erased follow the image's TLVs: unsigned data, appended after signing."""

    code = "TRAILING_DATA"


class VerificationError(ImageError):
    """The image is well formed but does not pass verification."""

    code = "VERIFY"


class HashMismatchError(VerificationError):
    """The image's SHA digest does not match its contents (tampered or corrupted)."""

    code = "HASH_MISMATCH"


class KeyMismatchError(VerificationError):
    """The image was signed by a key that is not among the trusted keys."""

    code = "KEY_MISMATCH"


class SignatureError(VerificationError):
    """The signature does not verify with the key it names."""

    code = "BAD_SIGNATURE"


class UnsignedImageError(VerificationError):
    """A signature was required but the image carries none."""

    code = "UNSIGNED"


class EncryptedImageError(VerificationError):
    """The image is marked encrypted (IMAGE_F_ENCRYPTED_*): otakit cannot decrypt its payload,
    and only accepts a payload in clear (``imgtool sign --clear``) where asked to."""

    code = "ENCRYPTED"


class DowngradeError(VerificationError):
    """The candidate image is older (version or security counter) than the running one."""

    code = "DOWNGRADE"
    agent_error = "INVALID_VERSION"


class DependencyError(VerificationError):
    """An image's DEPENDENCY TLV is not met by the images that would run after the update
    (MCUboot's ``boot_verify_dependencies`` would not upgrade any image)."""

    code = "DEPENDENCY"


class SigningError(ImageError):
    """An image cannot be built as asked (payload too large for the slot, bad header area...)."""

    code = "SIGN"
    agent_error = "GENERAL"
    exit_status = EXIT_USAGE


class DeltaError(OtakitError):
    """A delta patch (``otakit.image.delta``) cannot be made or applied. ``reason`` says why,
    one of :data:`DELTA_REASONS`: ``NOT_A_DELTA`` (no otakit delta header), ``UNSUPPORTED`` (a
    format or compression this otakit does not apply), ``TRUNCATED`` (fewer bytes than the
    header announces), ``CORRUPT`` (the patch's digest or contents are wrong), ``WRONG_BASE``
    (the base is not the image the patch was made from; nothing was written), ``RESULT`` (the
    output is not the image the patch announces). A device falls back to the full image."""

    code = "DELTA"
    agent_error = "VERIFY"

    def __init__(self, message: str, *, reason: str, value: object = None) -> None:
        super().__init__(message, value=value)
        self.reason = reason


DELTA_REASONS = ("NOT_A_DELTA", "UNSUPPORTED", "TRUNCATED", "CORRUPT", "WRONG_BASE", "RESULT")


# --- packages ----------------------------------------------------------------------------------


class PackageError(OtakitError):
    """Base of every error about a multi-image TAR package."""

    code = "PACKAGE"
    agent_error = "VERIFY"


class PackageFormatError(PackageError):
    """The TAR container itself is malformed (bad header, checksum, truncation)."""

    code = "PACKAGE_FORMAT"


class UnsafeMemberError(PackageError):
    """A member could escape the target folder or is not a regular file (link, device...)."""

    code = "PACKAGE_UNSAFE_MEMBER"


class ManifestError(PackageError):
    """components.json is missing, not first, not valid, or disagrees with the members."""

    code = "PACKAGE_MANIFEST"


class PackageLimitError(PackageError):
    """The package exceeds a limit: too many members, or a member larger than allowed."""

    code = "PACKAGE_LIMIT"


# --- job documents (protocols.md §1) ------------------------------------------------------------


class JobDocumentError(OtakitError):
    """A job document cannot be used."""

    code = "JOB_DOC"
    agent_error = "MALFORMED_JOB_DOC"


class NotAJobDocError(JobDocumentError):
    """The bytes are not a JSON object at all."""

    code = "NOT_A_JOB_DOC"
    agent_error = "NOT_A_JOB_DOC"


class MalformedJobDocError(JobDocumentError):
    """A JSON object, but not a valid job document (missing field, non-string, too long...)."""

    code = "MALFORMED_JOB_DOC"
    agent_error = "MALFORMED_JOB_DOC"


class WrongBoardError(JobDocumentError):
    """The job is for another board."""

    code = "WRONG_BOARD"
    agent_error = "WRONG_BOARD"


class InvalidVersionError(JobDocumentError):
    """The job's version is not strictly newer than the running one."""

    code = "INVALID_VERSION"
    agent_error = "INVALID_VERSION"


class ChunkHeaderError(OtakitError):
    """An MQTT image chunk whose header is malformed or inconsistent (protocols.md §3)."""

    code = "NOT_A_HEADER"
    agent_error = "NOT_A_HEADER"


# --- agent (names of the original middleware, protocols.md §8) --------------------------------


class AgentError(OtakitError):
    """An update attempt failed on the way."""

    code = "AGENT"


class JobFetchError(AgentError):
    """The job document could not be fetched."""

    code = "GET_JOB"
    agent_error = "GET_JOB"


class TransferError(AgentError):
    """The image could not be downloaded (after the configured tries); ``status`` is the
    server's last HTTP answer, None when it did not answer (timeout, connection lost)."""

    code = "GET_DATA"
    agent_error = "GET_DATA"

    def __init__(self, message: str, *, status: int | None = None, value: object = None) -> None:
        super().__init__(message, value=value)
        self.status = status


class RedirectError(AgentError):
    """A job, check-in answer or publisher names a URL the agent will not follow: not http(s),
    or plain HTTP for a device configured for an HTTPS server (unless allowed)."""

    code = "REDIRECT"
    agent_error = "REDIRECT"


class TransportUnsupportedError(AgentError):
    """The job asks for a transport this agent does not have."""

    code = "TRANSPORT_UNSUPPORTED"
    agent_error = "TRANSPORT_UNSUPPORTED"


class StoppedByAppError(AgentError):
    """The application's callback answered STOP."""

    code = "APP_RETURNED_STOP"
    agent_error = "APP_RETURNED_STOP"


# --- push (protocols.md §4) --------------------------------------------------------------------


class ControlPointError(OtakitError):
    """A control-point write or reply that is not one of §4's (unknown code, wrong length)."""

    code = "BAD_CONTROL_POINT"


class FrameError(OtakitError):
    """A loopback-link frame that is malformed (short, unknown opcode, too long)."""

    code = "BAD_FRAME"


class AttWriteError(OtakitError):
    """A write the OTA service refuses; the link answers it with ATT error ``error`` (an ``AttError`` of protocol/ble_ota.py)."""

    code = "ATT_WRITE"
    agent_error = "WRITE_STORAGE"

    def __init__(self, message: str, *, error: int, value: object = None) -> None:
        super().__init__(message, value=value)
        self.error = error


class CrcMismatchError(VerificationError):
    """The CRC-32 of the received bytes is not the one VERIFY announced."""

    code = "CRC_MISMATCH"


class LinkError(TransferError):
    """The link to the device failed: cannot connect, connection lost, no answer in time, or
    a write refused with an ATT error (``value`` is the ATT error code then)."""

    code = "LINK"


class PushRefusedError(AgentError):
    """The device answered 1 (failure) to a command; ``command`` names it."""

    code = "PUSH_REFUSED"

    def __init__(self, message: str, *, command: str, reply: int) -> None:
        super().__init__(message, value=reply)
        self.command = command
        self.reply = reply


class PushVerifyError(VerificationError):
    """The device answered 3 to VERIFY: the CRC-32 or the MCUboot checks failed there."""

    code = "PUSH_VERIFY"

    def __init__(self, message: str, *, command: str, reply: int) -> None:
        super().__init__(message, value=reply)
        self.command = command
        self.reply = reply


# --- MQTT sessions (protocols.md §3) -----------------------------------------------------------


class BrokerError(AgentError):
    """The broker cannot be reached, refuses the connection or a subscription."""

    code = "CONNECT"
    agent_error = "CONNECT"


class BrokerDroppedError(BrokerError):
    """The broker closed the connection in the middle of the session."""

    code = "SERVER_DROPPED"
    agent_error = "SERVER_DROPPED"


class NoUpdateError(AgentError):
    """The publisher answered "No Update Available"."""

    code = "NO_UPDATE"


class ResultError(AgentError):
    """The publisher did not acknowledge the device's result with "Result Received"."""

    code = "SENDING_RESULT"
    agent_error = "SENDING_RESULT"


# --- server ------------------------------------------------------------------------------------


class ServerError(OtakitError):
    """The update server cannot do what was asked (configuration, storage)."""

    code = "SERVER"


class BlobStoreError(ServerError):
    """The blob store (data folder or S3 bucket) cannot be used."""

    code = "BLOB_STORE"


class BlobNotFoundError(BlobStoreError):
    """No blob is stored under the key."""

    code = "BLOB_NOT_FOUND"


class ListenError(ServerError):
    """The server cannot listen where asked: the port is in use, the address is not one of
    this machine's, or the port needs privileges."""

    code = "LISTEN"
    exit_status = EXIT_USAGE


# What the server's rules refuse. The HTTP adapters turn these into answers in one place
# (server/app.py: HTTP_STATUS); the service layer raises them and knows nothing of HTTP.


class NotFoundError(ServerError):
    """The named product, artifact, device, deployment, rollout or token does not exist."""

    code = "NOT_FOUND"


class ConflictError(ServerError):
    """The request contradicts the current state (a rollout already aborted, a key in use)."""

    code = "CONFLICT"


class DeployedError(ConflictError):
    """The artifact is still deployed."""

    code = "DEPLOYED"


class RegisteredError(ConflictError):
    """The serial is already registered: the device must use its token."""

    code = "REGISTERED"


class TooManyTokensError(ConflictError):
    """A device has as many tokens as it may have."""

    code = "TOO_MANY_TOKENS"


class NoBoardError(ConflictError):
    """A job document needs a board and neither the artifact nor its product names one."""

    code = "NO_BOARD"


class AmbiguousError(ConflictError):
    """A name that fits more than one thing: a path without a product while more than one
    product allows anonymous devices, or an artifact id prefix shared by several artifacts."""

    code = "AMBIGUOUS"


class UnauthorizedError(ServerError):
    """No credentials, or credentials the server does not know (or revoked, or expired)."""

    code = "UNAUTHORIZED"


class ForbiddenError(ServerError):
    """The credentials are known but not allowed to do this."""

    code = "FORBIDDEN"


class NotOfferedError(ForbiddenError):
    """A device reported about, or asked for, an update that was not offered to it."""

    code = "NOT_OFFERED"


class TooLargeError(ServerError):
    """A request body or upload is larger than the server accepts."""

    code = "TOO_LARGE"


class UnprocessableError(UsageError):
    """A value that is well-formed but cannot be used (a name too long for a job document)."""

    code = "INVALID_VALUE"


class UploadRefusedError(UnprocessableError):
    """An upload that is well-formed but not acceptable (raw files not allowed, bad version)."""

    code = "UPLOAD_REFUSED"


class PrivateKeyError(UnprocessableError):
    """A private key was sent where only a public key belongs (trusting a signing key)."""

    code = "PRIVATE_KEY"


class VersionMismatchError(UnprocessableError):
    """An upload's version is not the one the uploader expected (``expect_version``)."""

    code = "VERSION_MISMATCH"


class VersionTakenError(ConflictError):
    """Another binary already has this version for the same product: bump the version."""

    code = "VERSION_TAKEN"


class StorageFullError(ServerError):
    """The disk (blob store or database) is full, or a file size limit was reached."""

    code = "STORAGE_FULL"


class UnavailableError(ServerError):
    """A service the server needs (database, blob store) does not answer; try again later."""

    code = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_after: int = 5, value: object = None) -> None:
        super().__init__(message, value=value)
        self.retry_after = retry_after


class ApiError(OtakitError):
    """A call to an otakit server failed; ``status`` is the HTTP status (0: no answer) and
    ``error`` the server's error code (``VERSION_TAKEN``...; None when it gave none)."""

    code = "API"
    agent_error = "CONNECT"

    def __init__(
        self, message: str, *, status: int = 0, error: str | None = None, value: object = None
    ) -> None:
        super().__init__(message, value=value)
        self.status = status
        self.error = error


# --- devices -----------------------------------------------------------------------------------


class FlashError(OtakitError):
    """A flash operation is invalid: out of range, misaligned, or not on a sector boundary."""

    code = "FLASH"
    agent_error = "WRITE_STORAGE"


class FileOperationError(OtakitError):
    """A gateway's file system (littlefs) refused an operation: full, corrupted, I/O."""

    code = "FILE_OPERATION"
    agent_error = "WRITE_STORAGE"


class McuProgramError(OtakitError):
    """Programming the external MCU failed, or it does not run the new version afterwards."""

    code = "MCU_PROGRAM"


class FlashMapError(OtakitError):
    """A flash map is invalid: overlapping or misaligned areas, a missing slot, bad JSON."""

    code = "FLASH_MAP"
    agent_error = "OPEN_STORAGE"
    exit_status = EXIT_USAGE


class BootError(OtakitError):
    """The bootloader found no image it can run."""

    code = "NO_BOOTABLE_IMAGE"
    agent_error = "GENERAL"


class DeviceError(OtakitError):
    """A simulated device folder is missing, incomplete or cannot be used as asked."""

    code = "DEVICE"
    exit_status = EXIT_USAGE
