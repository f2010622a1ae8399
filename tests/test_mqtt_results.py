"""Results and boards of devices running the original middleware, through ``otakit publisher``
and the update server's database (issue 14, points 4 to 6).

The device here is written from the Infineon OTA middleware's sources (Infineon/ota-update
4.5.0, ``include/cy_ota_defaults.h``, ``source/cy_ota_mqtt.c``, ``source/cy_ota_agent.c``), not
from otakit's device code:

- its build target ``CY_TARGET_BOARD_STRING`` is ``APP_<KIT>`` (ModusToolbox's TARGET; the
  code example Infineon/mtb-example-ota-mqtt has ``"Board":"APP_<KIT>"`` in its job file and
  its publisher listens on ``OTAUpdate/APP_<KIT>/publish_notify``); every topic is
  built from it, and ``cy_ota_parse_job_info`` accepts a job only if ``Version`` is strictly
  newer (else INVALID_VERSION) and then ``Board`` equals that string exactly (else
  WRONG_BOARD), whatever the job's ``Message`` says;
- its unique topic is ``COMPANY/APP_<KIT>/OTAImage/<tick & 0xFFFF>``, made once per session;
- its requests are ``sprintf`` of the default templates, which hard-code
  ``"BoardName": "CY8CPROTO_062_4343W"`` for every kit (the serial number is set per device
  here, as an application does by overriding the templates in ``cy_ota_config.h``);
- its result is ``{"Message":"Success"|"Failure", "UniqueTopicName": "<topic>"}`` on
  ``COMPANY/APP_<KIT>/publish_notify`` (``CY_OTA_MQTT_RESULT_JSON``): no serial number.

The device does not listen for "Result Received" (it reconnects for the result without
subscribing its unique topic); the tests listen there to know the publisher is done. Every
wait is on a message or a log line, with a deadline.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import sqlite3
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from .mqtt_harness import Broker
from .server_harness import Server, postgres_database, start_server

# The broker, server and publisher command of the publisher's tests (none of its tests run here).
from .test_publisher import (  # noqa: F401 - fixtures
    KEY,
    WAIT,
    Command,
    broker,
    command,
    fresh_company,
    server,
    signed_image,
)

KIT = "CY8CPROTO_062_4343W"  # the kit the templates' BoardName names
OTHER_KIT = "CY8CKIT_062S2_43012"
# cy_ota_mqtt_chunk_payload_header_t: magic, offset_to_data, ota_image_type, version
# major/minor/build, total_size, image_offset, data_size, total_num_payloads, this_payload_index
HEADER = struct.Struct("<8s5H2I3H")

# include/cy_ota_defaults.h, as sprintf fills them (the C line continuations keep the spaces)
UPDATE_AVAILABILITY = (
    '{"Message":"Update Availability", "Manufacturer": "Express Widgits Corporation", '
    '"ManufacturerID": "EWCO", "ProductID": "Easy Widgit", "SerialNumber": "%s", '
    '"BoardName": "CY8CPROTO_062_4343W", "Version": "%d.%d.%d", "UniqueTopicName": "%s"}'
)
REQUEST_UPDATE = UPDATE_AVAILABILITY.replace("Update Availability", "Request Update")
RESULT = '{"Message":"%s", "UniqueTopicName": "%s"}'

_ticks = itertools.count(4321)


class OriginalDevice:
    """One device running the middleware's MQTT job flow (protocols.md §3)."""

    def __init__(
        self, port: int, company: str, serial: str, *, kit: str = KIT, version: str = "1.0.0"
    ) -> None:
        self.target = "APP_" + kit  # CY_TARGET_BOARD_STRING
        self.company, self.serial = company, serial
        self.version = tuple(int(part) for part in version.split("."))
        self.notify = f"{company}/{self.target}/publish_notify"  # SUBSCRIBER_PUBLISH_TOPIC
        self.unique = ""
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._acks: queue.Queue[int] = queue.Queue()
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:12]}")
        client.on_message = lambda _c, _u, m: self.inbox.put((m.topic, bytes(m.payload)))
        client.on_subscribe = lambda _c, _u, mid, *_: self._acks.put(mid)
        client.connect("127.0.0.1", port, keepalive=60)
        client.loop_start()
        self.client = client

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def new_session(self) -> str:
        """cy_ota_wait_for_start: a new unique topic, subscribed before anything is asked."""
        self.unique = f"{self.company}/{self.target}/OTAImage/{next(_ticks) & 0xFFFF}"
        _, mid = self.client.subscribe(self.unique, qos=1)
        while self._acks.get(timeout=WAIT) != mid:
            pass
        return self.unique

    def _publish(self, text: str) -> None:
        self.client.publish(self.notify, text.encode(), qos=1).wait_for_publish(WAIT)

    def _request(self, template: str) -> None:
        self._publish(template % (self.serial, *self.version, self.unique))

    def _next(self) -> bytes:
        topic, payload = self.inbox.get(timeout=WAIT)
        assert topic == self.unique, (topic, payload[:80])
        return payload

    def ask(self) -> dict[str, str]:
        """Send "Update Availability"; the job document that comes back on the unique topic."""
        self._request(UPDATE_AVAILABILITY)
        job = json.loads(self._next())
        assert isinstance(job, dict)
        return job

    def parse(self, job: dict[str, str]) -> str | None:
        """cy_ota_parse_job_info's verdict: None, "INVALID_VERSION" or "WRONG_BOARD"."""
        fields = {key.lower(): value for key, value in job.items()}  # keys: strncasecmp
        offered = tuple(int(part) for part in fields.get("version", "0.0.0").split("."))
        if not offered > self.version:
            return "INVALID_VERSION"
        if fields.get("board") != self.target:
            return "WRONG_BOARD"
        return None

    def download(self) -> bytes:
        """Send "Request Update", then take chunks on the unique topic until the image is
        complete (cy_ota_mqtt_parse_chunk's checks; written by image_offset)."""
        self._request(REQUEST_UPDATE)
        image = bytearray()
        written, total = 0, None
        while total is None or written < total:
            payload = self._next()
            magic, to_data, kind, *version, size, offset, data_size, count, index = (
                HEADER.unpack_from(payload)
            )
            assert (magic, kind) == (b"OTAImage", 0)
            assert to_data <= len(payload)
            assert data_size <= size
            assert index <= count
            assert tuple(version) > self.version  # else INVALID_VERSION
            data = payload[to_data : to_data + data_size]
            total = size
            image[offset : offset + len(data)] = data
            written += len(data)
        return bytes(image)

    def report(self, message: str) -> dict[str, str]:
        """The result (CY_OTA_MQTT_RESULT_JSON) and, heard on the unique topic, the answer."""
        self._publish(RESULT % (message, self.unique))
        answer = json.loads(self._next())
        assert isinstance(answer, dict)
        return answer


# --- the server side ---------------------------------------------------------------------------


def _product(admin: httpx.Client) -> str:
    product = f"p-{uuid.uuid4().hex[:8]}"
    assert admin.put(f"/api/v1/products/{product}", json={}).status_code == 200
    return product


def _deploy(
    admin: httpx.Client, product: str, version: str, size: int, board: str = KIT
) -> tuple[dict[str, Any], bytes]:
    data = signed_image(version, size)
    params = {"name": "app.img", "board": board}
    artifact = admin.post("/api/v1/artifacts", params=params, content=data)
    assert artifact.status_code == 201, artifact.text
    body = {"artifact_id": artifact.json()["id"], "product": product, "group": "g"}
    deployment = admin.post("/api/v1/deployments", json=body)
    assert deployment.status_code == 201, deployment.text
    return deployment.json(), data


def _register(admin: httpx.Client, product: str, board: str = KIT) -> str:
    serial = f"S-{uuid.uuid4().hex[:8]}"
    body = {"product": product, "group": "g", "board": board, "version": "1.0.0"}
    assert admin.put(f"/api/v1/devices/{serial}", json=body).status_code == 200
    return serial


def _counts(admin: httpx.Client, deployment: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = admin.get(f"/api/v1/deployments/{deployment['id']}").json()["counts"]
    return counts


def _device(admin: httpx.Client, serial: str) -> dict[str, Any]:
    found: dict[str, Any] = admin.get(f"/api/v1/devices/{serial}").json()
    return found


def _sessions(srv: Server, serial: str) -> list[str]:
    """The unique topics the server's database keeps for a device (SQLite)."""
    with contextlib.closing(sqlite3.connect(srv.data / "otakit.db")) as db:
        rows = db.execute("SELECT topic FROM mqtt_sessions WHERE device_serial = ?", (serial,))
        return [topic for (topic,) in rows]


@pytest.fixture(scope="module")
def publisher(broker: Broker, server: Server) -> Iterator[tuple[str, Command]]:  # noqa: F811
    """``otakit publisher`` on the server's data, for APP_ boards (the original devices' topics;
    ``Board`` is then always ``APP_<KIT>``)."""
    company = fresh_company()
    args = ("--data", server.data, "-c", company, "--port", str(broker.port), "--app-prefix")
    with command(*args) as running:
        yield company, running


# --- point 4: results are recorded for the device and deployment of the session ---------------


def test_success_naming_only_its_unique_topic_is_recorded_for_that_device(
    broker: Broker,  # noqa: F811 - the imported fixture
    server: Server,  # noqa: F811 - the imported fixture
    publisher: tuple[str, Command],
) -> None:
    company, running = publisher
    admin = server.admin_client()
    product = _product(admin)
    deployment, data = _deploy(admin, product, "1.1.0", 30_000)
    updated, bystander = _register(admin, product), _register(admin, product)

    device = OriginalDevice(broker.port, company, updated)
    other = OriginalDevice(broker.port, company, bystander)
    try:
        device.new_session()
        job = device.ask()
        assert (job["Message"], job["Version"]) == ("Update Available", "1.1.0")
        assert device.parse(job) is None
        assert device.download() == data
        assert device.report("Success")["Message"] == "Result Received"

        other.new_session()  # offered the same update, still downloading: no result yet
        assert other.parse(other.ask()) is None
        latest = other.new_session()  # it rebooted and asks again: one session per device
        assert other.parse(other.ask()) is None

        stranger = other.new_session()  # a topic the publisher never answered on
        assert other.report("Success") == {
            "Message": "Result Received",
            "UniqueTopicName": stranger,
        }
    finally:
        device.close()
        other.close()

    # "Result Received" comes once the result is handled, so the database has it by now
    assert _device(admin, updated)["status"] == "applying"
    assert _device(admin, bystander)["status"] is None
    counts = _counts(admin, deployment)
    assert (counts["Applying"], counts["Error"]) == (1, 0)
    assert _sessions(server, bystander) == [latest]  # its earlier session was replaced
    running.wait_for(f"recorded as applying for {updated} in deployment {deployment['id']}")
    line = running.wait_for(f"no session on {stranger}")
    assert "not recorded" in line


def test_failure_is_recorded_as_an_error_of_that_device(
    broker: Broker,  # noqa: F811 - the imported fixture
    server: Server,  # noqa: F811 - the imported fixture
    publisher: tuple[str, Command],
) -> None:
    company, running = publisher
    admin = server.admin_client()
    product = _product(admin)
    deployment, data = _deploy(admin, product, "1.2.0", 31_000)
    serial = _register(admin, product)

    device = OriginalDevice(broker.port, company, serial)
    try:
        device.new_session()
        assert device.parse(device.ask()) is None
        assert device.download() == data
        assert device.report("Failure")["Message"] == "Result Received"
    finally:
        device.close()

    status = _device(admin, serial)
    assert (status["status"], status["error"]) == ("error", "MCU Download fail")
    counts = _counts(admin, deployment)
    assert (counts["Applying"], counts["Error"]) == (0, 1)
    running.wait_for(f"recorded as error for {serial} in deployment {deployment['id']}")


# --- point 6: a result after "No Update Available" is no update's result ----------------------


def test_a_result_after_no_update_available_counts_for_nothing(
    broker: Broker,  # noqa: F811 - the imported fixture
    server: Server,  # noqa: F811 - the imported fixture
    publisher: tuple[str, Command],
) -> None:
    """The job table sends a parse failure to RESULT_REDIRECT ("failed to parse, send
    result"); in 4.5.0 the last-error check then ends the session at OTA_COMPLETE without one,
    and on the way through RESULT_CONNECT the error would be cleared, so a result, if one comes,
    may say either Failure or Success. Neither may count."""
    company, running = publisher
    admin = server.admin_client()
    product = _product(admin)
    deployment, data = _deploy(admin, product, "1.3.0", 32_000)
    serial = _register(admin, product)

    device = OriginalDevice(broker.port, company, serial)
    try:
        device.new_session()
        assert device.parse(device.ask()) is None
        assert device.download() == data
        assert device.report("Success")["Message"] == "Result Received"
        assert _device(admin, serial)["status"] == "applying"

        device.version = (1, 3, 0)  # rebooted into the update
        for message in ("Failure", "Success"):
            device.new_session()
            job = device.ask()
            assert job["Message"] == "No Update Available"
            assert device.parse(job) == "INVALID_VERSION"
            assert device.report(message)["Message"] == "Result Received"
            assert _device(admin, serial)["status"] == "applied"  # its check-in at 1.3.0
    finally:
        device.close()

    counts = _counts(admin, deployment)
    assert (counts["Applied"], counts["Applying"], counts["Error"]) == (1, 0, 0)
    running.wait_for(f"recorded as applying for {serial}")
    for message in ("Failure", "Success"):
        line = running.wait_for(f"{serial} was answered 'No Update Available'")
        assert f"): {message}" in line
        assert "not recorded" in line


# --- point 5: the topic's board, not the template's BoardName -----------------------------------


def test_board_name_of_another_kit_gets_the_image_and_board_of_the_topic(
    broker: Broker,  # noqa: F811 - the imported fixture
    server: Server,  # noqa: F811 - the imported fixture
) -> None:
    admin = server.admin_client()
    product = _product(admin)
    # newer, but for the kit the template's BoardName names
    template_kit, _ = _deploy(admin, product, "3.0.0", 33_000, board=KIT)
    own_kit, data = _deploy(admin, product, "1.1.0", 34_000, board=OTHER_KIT)
    serial = _register(admin, product, OTHER_KIT)

    company = fresh_company()  # the default: every board of it, with and without APP_
    with command("--data", server.data, "-c", company, "--port", str(broker.port)) as running:
        device = OriginalDevice(broker.port, company, serial, kit=OTHER_KIT)
        try:
            device.new_session()
            job = device.ask()
            assert (job["Message"], job["Version"]) == ("Update Available", "1.1.0")
            assert job["Board"] == "APP_" + OTHER_KIT
            assert device.parse(job) is None
            assert device.download() == data
            assert device.report("Success")["Message"] == "Result Received"
        finally:
            device.close()
        assert _counts(admin, own_kit)["Applying"] == 1
        assert _counts(admin, template_kit)["Applying"] == 0
        running.wait_for(f"recorded as applying for {serial} in deployment {own_kit['id']}")


# --- the same on PostgreSQL --------------------------------------------------------------------


def test_results_on_postgresql(
    broker: Broker,  # noqa: F811 - the imported fixture
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    with postgres_database() as url:
        srv = start_server(tmp_path_factory.mktemp("pg-server"), database_url=url)
        try:
            admin = srv.admin_client()
            assert admin.post("/api/v1/keys", content=KEY.public_key.pem()).status_code == 201
            product = _product(admin)
            deployment, data = _deploy(admin, product, "1.4.0", 35_000)
            good, bad = _register(admin, product), _register(admin, product)
            company = fresh_company()
            args = ("--data", srv.data, "--database", url, "-c", company, "--app-prefix")
            with command(*args, "--port", str(broker.port)):
                updated = OriginalDevice(broker.port, company, good)
                failed = OriginalDevice(broker.port, company, bad)
                try:
                    for device in (updated, failed):
                        device.new_session()
                        device.ask()
                        device.new_session()  # asked again: the session row is replaced
                        assert device.parse(device.ask()) is None
                        assert device.download() == data
                    assert updated.report("Success")["Message"] == "Result Received"
                    assert failed.report("Failure")["Message"] == "Result Received"
                    updated.version = (1, 4, 0)
                    updated.new_session()
                    assert updated.parse(updated.ask()) == "INVALID_VERSION"
                    assert updated.report("Failure")["Message"] == "Result Received"
                finally:
                    updated.close()
                    failed.close()
            assert _device(admin, good)["status"] == "applied"
            assert _device(admin, bad)["status"] == "error"
            counts = _counts(admin, deployment)
            assert (counts["Applied"], counts["Applying"], counts["Error"]) == (1, 0, 1)
        finally:
            srv.stop()
