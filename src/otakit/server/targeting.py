"""Which devices a deployment targets: its tag condition, the artifact's board, the version the
device runs (:func:`targets`).

Tag conditions as in the cloud reference design.

A condition is one or more ``tags.NAME='VALUE'`` terms joined by ``AND`` (case-insensitive
keyword), e.g. ``tags.productType='X' AND tags.deviceGroup='Y'``, the form protocols.md §7
uses; ``product`` + ``group`` are shorthand for exactly that, and a deployment's ``board`` adds
``tags.board='B'``. A device's ``productType`` and ``deviceGroup`` tags come from its product and
group, its ``board`` tag (when matching, unless set explicitly) from its board; any other tags
are set by the operator.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from otakit.errors import OtakitError, UsageError
from otakit.protocol.version import FirmwareVersion

if TYPE_CHECKING:
    from otakit.server.models import Artifact, Deployment, Device

PRODUCT_TAG = "productType"
GROUP_TAG = "deviceGroup"
BOARD_TAG = "board"  # from the device's board: a deployment for one board only

_TERM = re.compile(r"\s*tags\.([A-Za-z_][A-Za-z0-9_]*)\s*=\s*'((?:[^'\\]|\\.)*)'\s*")
_AND = re.compile(r"\s+AND\s+", re.IGNORECASE)


def product_group_condition(product: str, group: str | None, board: str | None = None) -> str:
    terms = [f"tags.{PRODUCT_TAG}='{_quote(product)}'"]
    if group:
        terms.append(f"tags.{GROUP_TAG}='{_quote(group)}'")
    if board:
        terms.append(board_term(board))
    return " AND ".join(terms)


def board_term(board: str) -> str:
    """The condition term that targets the devices of one board."""
    return f"tags.{BOARD_TAG}='{_quote(board)}'"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def parse_condition(text: str) -> dict[str, str]:
    """The required tag values; raise UsageError on anything else."""
    if not text or not text.strip():
        raise UsageError("the target condition is empty")
    required: dict[str, str] = {}
    for term in _AND.split(text.strip()):
        match = _TERM.fullmatch(term)
        if match is None:
            raise UsageError(
                f"cannot read target term {term.strip()!r}: expected tags.NAME='VALUE' "
                "terms joined by AND",
                value=text,
            )
        name, value = match.group(1), re.sub(r"\\(.)", r"\1", match.group(2))
        if required.get(name, value) != value:
            raise UsageError(f"tag {name} is required to have two values", value=text)
        required[name] = value
    return required


def matches(required: dict[str, str], tags: dict[str, str]) -> bool:
    return all(tags.get(name) == value for name, value in required.items())


def version_of(text: str | None) -> FirmwareVersion | None:
    """``text`` as a version, or None when it is empty or not a version."""
    if not text:
        return None
    try:
        return FirmwareVersion.parse(text)
    except OtakitError:
        return None


def device_tags(device: Device) -> dict[str, str]:
    """The device's tags as conditions see them: ``productType`` from its product and ``board``
    from its board, unless set explicitly."""
    tags = shown_tags(device)
    if device.board and BOARD_TAG not in tags:
        tags[BOARD_TAG] = device.board
    return tags


def shown_tags(device: Device) -> dict[str, str]:
    """The device's tags as the management API shows them: ``productType`` from its product
    unless set explicitly."""
    tags = dict(device.tags or {})
    if device.product and PRODUCT_TAG not in tags:
        tags[PRODUCT_TAG] = device.product
    return tags


def wanted(deployment: Deployment, artifact: Artifact, version: str | None) -> bool:
    """Whether a device at ``version`` should get the deployment's artifact (never an older
    one unless the deployment allows a downgrade)."""
    new, current = version_of(artifact.version), version_of(version)
    if new is None:
        return False
    if current is None:
        return True
    return new != current if deployment.downgrade else new > current


def board_fits(artifact: Artifact, device: Device) -> bool:
    return not (artifact.board and device.board and artifact.board != device.board)


def targets(
    deployment: Deployment, artifact: Artifact, device: Device, required: dict[str, str]
) -> bool:
    """Whether the deployment (its parsed condition ``required``) targets ``device`` now:
    its tags match, its board fits and it wants the version."""
    return (
        matches(required, device_tags(device))
        and board_fits(artifact, device)
        and wanted(deployment, artifact, device.version)
    )
