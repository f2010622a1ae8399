"""hawkBit's DDI API against a real ``otakit serve`` (one SQLite server for the module, started
with ``--ddi-poll 90``): TargetToken, GatewayToken and anonymous authorization, registration on
the first poll, configData modes and the server's own tags, the deploymentBase document and
its working links (Range, resume, If-Range, HEAD, MD5SUM), feedback as status reports in the
deployment's counts, closed actions not offered again, installedBase, cancelAction after a
rollout is aborted (confirmed and rejected), and malformed bodies. The pure rules of
service/ddi.py are checked directly at the end.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from otakit.errors import UnprocessableError
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.server.service import ddi
from otakit.server.service.ddi import Execution, Finished

from .server_harness import BIN, Server, start_server

KEY = SigningKey.generate("ecdsa-p256")
OCTETS = {"content-type": "application/octet-stream"}
PEM = {"content-type": "application/x-pem-file"}
FILE_SIZE = 10_000


@dataclass
class Api:
    server: Server
    admin: httpx.Client

    def product(self, **settings: Any) -> str:
        name = f"p-{uuid.uuid4().hex[:8]}"
        answer = self.admin.put(f"/api/v1/products/{name}", json={"allow_raw": True, **settings})
        assert answer.status_code == 200, answer.text
        return name

    def raw(self, product: str, version: str = "1.0.1") -> tuple[dict[str, Any], bytes]:
        data = random.Random(f"{product}/{version}").randbytes(FILE_SIZE)
        answer = self.admin.post(
            "/api/v1/artifacts",
            params={"name": "update.swu", "product": product, "version": version},
            content=data,
            headers=OCTETS,
        )
        assert answer.status_code == 201, answer.text
        return answer.json(), data

    def deploy(self, artifact: dict[str, Any], product: str, group: str | None = None) -> int:
        body = {"artifact_id": artifact["id"], "product": product, "group": group}
        answer = self.admin.post("/api/v1/deployments", json=body)
        assert answer.status_code == 201, answer.text
        number: int = answer.json()["id"]
        return number

    def counts(self, deployment: int) -> dict[str, int]:
        answer = self.admin.get(f"/api/v1/deployments/{deployment}")
        assert answer.status_code == 200, answer.text
        counts: dict[str, int] = answer.json()["counts"]
        return {k: v for k, v in counts.items() if v}

    def device(self, serial: str) -> dict[str, Any]:
        answer = self.admin.get(f"/api/v1/devices/{serial}")
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found

    def token(self, role: str, **body: Any) -> str:
        answer = self.admin.post("/api/v1/tokens", json={"role": role, **body})
        assert answer.status_code == 201, answer.text
        token: str = answer.json()["token"]
        return token

    def gateway(self, product: str, group: str | None = "g1") -> str:
        return self.token("enroll", product=product, group=group)

    def client(self, scheme: str | None = None, token: str | None = None) -> httpx.Client:
        headers = {"authorization": f"{scheme} {token}"} if scheme else {}
        return httpx.Client(base_url=self.server.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    server = start_server(tmp_path_factory.mktemp("ddi"), extra=("--ddi-poll", "90"))
    try:
        admin = server.admin_client()
        assert admin.post("/api/v1/keys", content=KEY.public_key.pem(), headers=PEM).is_success
        yield Api(server, admin)
    finally:
        server.stop()


def serial() -> str:
    return f"dev-{uuid.uuid4().hex[:10]}"


def base(controller: str, tenant: str = "DEFAULT") -> str:
    return f"/{tenant}/controller/v1/{controller}"


def poll(client: httpx.Client, controller: str, tenant: str = "DEFAULT") -> dict[str, Any]:
    answer = client.get(base(controller, tenant))
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def links(client: httpx.Client, controller: str) -> dict[str, str]:
    return {k: v["href"] for k, v in poll(client, controller)["_links"].items()}


def feedback(
    execution: str, finished: str = "none", details: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    status = {"execution": execution, "result": {"finished": finished}, "details": details or []}
    return {"status": status, **extra}


def one_line_422(answer: httpx.Response) -> str:
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert set(body) == {"error", "message"}, body
    message: str = body["message"]
    assert message
    assert "\n" not in message
    return message


@dataclass
class Offered:
    """A device registered by a GatewayToken, offered a raw file."""

    product: str
    controller: str
    client: httpx.Client
    deployment: int
    artifact: dict[str, Any]
    data: bytes


@pytest.fixture
def offered(api: Api) -> Iterator[Offered]:
    product = api.product()
    artifact, data = api.raw(product)
    deployment = api.deploy(artifact, product, "g1")
    with api.client("GatewayToken", api.gateway(product)) as client:
        yield Offered(product, serial(), client, deployment, artifact, data)


# --- authorization --------------------------------------------------------------------------


def test_a_gateway_token_registers_a_device_on_its_first_poll(api: Api, offered: Offered) -> None:
    answer = poll(offered.client, offered.controller)
    assert answer["config"] == {"polling": {"sleep": "00:01:30"}}  # --ddi-poll 90
    hrefs = {k: v["href"] for k, v in answer["_links"].items()}
    url = f"{api.server.url}{base(offered.controller)}"
    assert hrefs == {
        "deploymentBase": f"{url}/deploymentBase/{offered.deployment}",
        "configData": f"{url}/configData",
    }
    device = api.device(offered.controller)
    assert device["product"] == offered.product
    assert device["tags"] == {"productType": offered.product, "deviceGroup": "g1"}
    # polling again is the same device, not a second registration
    assert poll(offered.client, offered.controller)["_links"].keys() == hrefs.keys()


def test_a_gateway_token_acts_only_for_its_product(api: Api, offered: Offered) -> None:
    poll(offered.client, offered.controller)
    other = api.product()
    with api.client("GatewayToken", api.gateway(other)) as stranger:
        refused = stranger.get(base(offered.controller))
        assert refused.status_code == 403, refused.text
        deployment = stranger.get(f"{base(offered.controller)}/deploymentBase/{offered.deployment}")
        assert deployment.status_code == 403
    assert api.device(offered.controller)["product"] == offered.product
    # a gateway token never registers anything but on a poll
    unknown = offered.client.get(f"{base(serial())}/deploymentBase/{offered.deployment}")
    assert unknown.status_code == 404


def test_a_target_token_acts_only_for_its_device(api: Api, offered: Offered) -> None:
    mine, other = serial(), serial()
    for device in (mine, other):
        answer = api.admin.put(
            f"/api/v1/devices/{device}", json={"product": offered.product, "group": "g1"}
        )
        assert answer.status_code == 200, answer.text
    token = api.token("device", device=mine)
    with api.client("TargetToken", token) as client:
        assert "deploymentBase" in poll(client, mine)["_links"]
        assert client.get(base(other)).status_code == 403
    # a device token is not a gateway token, an enrollment token is not a target token
    with api.client("GatewayToken", token) as client:
        assert client.get(base(mine)).status_code == 403
    with api.client("TargetToken", api.gateway(offered.product)) as client:
        assert client.get(base(mine)).status_code == 403
    # unknown tokens and other schemes (an admin's Bearer token included) are refused
    with api.client("TargetToken", token[:-4] + "xxxx") as client:
        assert client.get(base(mine)).status_code == 401
    with api.client("Bearer", api.server.admin) as client:
        answer = client.get(base(mine))
        assert answer.status_code == 401
        assert "TargetToken" in answer.json()["message"]


def test_anonymous_devices_only_where_the_product_allows_them(api: Api) -> None:
    closed, open_ = api.product(), api.product(anonymous=True)
    with api.client() as client:
        refused = client.get(base(serial(), tenant=closed))
        assert refused.status_code == 401, refused.text
        device = serial()
        assert poll(client, device, tenant=open_)["_links"] == {
            "configData": {"href": f"{api.server.url}{base(device, open_)}/configData"}
        }
        assert api.device(device)["product"] == open_
        # a registered device of a product without anonymous devices needs its token
        registered = serial()
        assert api.admin.put(f"/api/v1/devices/{registered}", json={"product": closed}).is_success
        assert client.get(base(registered, tenant=open_)).status_code == 401


def test_a_controller_id_may_be_longer_than_a_job_documents_serial(api: Api) -> None:
    """Zephyr's default controller id is its board name and hardware id in hex: often longer
    than the 31 bytes a job document's SerialNumber holds, which no DDI device is sent."""
    product = api.product()
    zephyr = "nrf52840dk_nrf52840-" + "0123456789abcdef" * 2  # 52 characters
    with api.client("GatewayToken", api.gateway(product)) as client:
        assert "configData" in poll(client, zephyr)["_links"]
        assert api.device(zephyr)["product"] == product
        one_line_422(client.get(base("x" * 65)))
        one_line_422(client.get(base("bad!id")))


# --- configData -----------------------------------------------------------------------------


def test_config_data_merges_replaces_and_removes_but_never_the_servers_tags(
    api: Api, offered: Offered
) -> None:
    client, controller = offered.client, offered.controller
    url = links(client, controller)["configData"]
    server_tags = {"productType": offered.product, "deviceGroup": "g1"}

    def put(body: dict[str, Any]) -> dict[str, str]:
        answer = client.put(url, json=body)
        assert answer.status_code == 200, answer.text
        tags: dict[str, str] = api.device(controller)["tags"]
        return tags

    legacy = {"id": "", "time": "20240101T120000", "status": {"execution": "closed"}}
    first = {"VIN": "JH4TB2H26CC000000", "hwRevision": "2", "productType": "x"}
    assert put({**legacy, "data": first}) == {
        "VIN": "JH4TB2H26CC000000",
        "hwRevision": "2",
        **server_tags,
    }
    assert "configData" not in links(client, controller)  # asked only until it answers
    assert put({"mode": "merge", "data": {"hwRevision": "3"}})["hwRevision"] == "3"
    assert put({"mode": "replace", "data": {"mac": "aa", "deviceGroup": "g9"}}) == {
        "mac": "aa",
        **server_tags,
    }
    assert put({"mode": "remove", "data": {"mac": "", "productType": ""}}) == server_tags
    # Zephyr's content type, with a charset
    zephyr = client.put(
        url,
        content=b'{"mode":"merge","data":{"VIN":"c0ffee"}}',
        headers={"content-type": "application/json;charset=UTF-8"},
    )
    assert zephyr.status_code == 200, zephyr.text
    assert api.device(controller)["tags"] == {"VIN": "c0ffee", **server_tags}
    assert put({"mode": "remove", "data": {"VIN": ""}}) == server_tags
    assert "configData" in links(client, controller)  # no attributes left: asked again


def test_config_data_bodies_are_bounded(api: Api, offered: Offered) -> None:
    client = offered.client
    url = f"{base(offered.controller)}/configData"
    poll(client, offered.controller)
    assert "mode" in one_line_422(client.put(url, json={"mode": "bogus", "data": {}}))
    too_many = {f"k{i}": "v" for i in range(ddi.MAX_ATTRIBUTES + 1)}
    assert "data" in one_line_422(client.put(url, json={"data": too_many}))
    one_line_422(client.put(url, json={"data": {"k": "v" * 129}}))
    one_line_422(client.put(url, json={"data": {"k": 5}}))
    one_line_422(
        client.put(url, content=b"{not json", headers={"content-type": "application/json"})
    )
    # valid, but past the 8 KiB device body limit (body_limits.DEVICE_BODY)
    huge = {"data": {f"k{i}": "v" * 128 for i in range(ddi.MAX_ATTRIBUTES)}}
    assert client.put(url, json=huge).status_code == 413


# --- deploymentBase and downloads ------------------------------------------------------------


def test_deployment_base_names_the_file_its_hashes_and_links_that_work(
    api: Api, offered: Offered
) -> None:
    client, data = offered.client, offered.data
    href = links(client, offered.controller)["deploymentBase"]
    answer = client.get(href, params={"c": "-2129030598"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-length"] == str(len(answer.content))
    document = answer.json()
    assert document["id"] == str(offered.deployment)
    assert int(document["id"]) == offered.deployment
    deployment = document["deployment"]
    assert (deployment["download"], deployment["update"]) == ("forced", "forced")
    [chunk] = deployment["chunks"]
    assert (chunk["part"], chunk["version"], chunk["name"]) == ("os", "1.0.1", "update.swu")
    [artifact] = chunk["artifacts"]
    assert artifact["filename"] == "update.swu"
    assert artifact["size"] == len(data)
    assert artifact["hashes"] == {
        "sha1": hashlib.sha1(data).hexdigest(),
        "md5": hashlib.md5(data).hexdigest(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    url = artifact["_links"]["download-http"]["href"]
    assert url.startswith(f"{api.server.url}{base(offered.controller)}/softwaremodules/")
    assert set(artifact["_links"]) == {"download-http", "md5sum-http"}  # plain HTTP
    assert "null" not in answer.text  # Zephyr's parser fails on any null

    # asking for the file's first byte makes the device downloading (Zephyr sends no feedback)
    assert client.head(url).status_code == 200
    assert client.get(url, headers={"range": "bytes=4096-4100"}).status_code == 206
    assert api.counts(offered.deployment) == {}
    whole = client.get(url)
    assert api.counts(offered.deployment) == {"Downloading": 1}
    assert whole.status_code == 200
    assert whole.content == data
    # cut after the first 4 KiB, then resumed from there (If-Range: the file did not change)
    first = client.get(url, headers={"range": "bytes=0-4095"})
    assert first.status_code == 206
    assert first.headers["content-range"] == f"bytes 0-4095/{len(data)}"
    rest = client.get(url, headers={"range": "bytes=4096-", "if-range": first.headers["etag"]})
    assert rest.status_code == 206
    assert rest.headers["content-range"] == f"bytes 4096-{len(data) - 1}/{len(data)}"
    assert first.content + rest.content == data
    stale = client.get(url, headers={"range": "bytes=4096-", "if-range": '"other"'})
    assert stale.status_code == 200
    assert stale.content == data
    assert client.get(url, headers={"range": f"bytes={len(data)}-"}).status_code == 416
    head = client.head(url)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(data))
    assert head.content == b""

    md5sum = client.get(artifact["_links"]["md5sum-http"]["href"])
    assert md5sum.status_code == 200
    assert md5sum.text == f"{hashlib.md5(data).hexdigest()}  update.swu\n"
    missing = client.get(url.replace("update.swu", "other.swu"))
    assert missing.status_code == 404


def test_an_mcuboot_image_is_the_bapp_part(api: Api) -> None:
    product = api.product(allow_raw=False)
    payload = random.Random(product).randbytes(3000)
    image = sign_image(payload, KEY, SignOptions(ImageVersion.parse("2.1.0"), pad_header=True))
    uploaded = api.admin.post(
        "/api/v1/artifacts",
        params={"name": "app.img", "product": product},
        content=image,
        headers=OCTETS,
    )
    assert uploaded.status_code == 201, uploaded.text
    deployment = api.deploy(uploaded.json(), product)
    device = serial()
    with api.client("GatewayToken", api.gateway(product, None)) as client:
        document = client.get(links(client, device)["deploymentBase"]).json()
        [chunk] = document["deployment"]["chunks"]
        assert (chunk["part"], chunk["version"]) == ("bApp", "2.1.0")
        assert document["id"] == str(deployment)
        [artifact] = chunk["artifacts"]
        assert artifact["hashes"]["sha256"] == hashlib.sha256(image).hexdigest()
        assert client.get(artifact["_links"]["download-http"]["href"]).content == image


def test_hashes_missing_from_an_older_artifact_are_computed(api: Api, offered: Offered) -> None:
    with sqlite3.connect(api.server.data / "otakit.db") as db:
        db.execute(
            "UPDATE artifacts SET sha1 = NULL, md5 = NULL WHERE id = ?", (offered.artifact["id"],)
        )
    href = links(offered.client, offered.controller)["deploymentBase"]
    [chunk] = offered.client.get(href).json()["deployment"]["chunks"]
    assert chunk["artifacts"][0]["hashes"]["sha1"] == hashlib.sha1(offered.data).hexdigest()
    with sqlite3.connect(api.server.data / "otakit.db") as db:
        stored = db.execute(
            "SELECT md5 FROM artifacts WHERE id = ?", (offered.artifact["id"],)
        ).fetchone()
    assert stored == (hashlib.md5(offered.data).hexdigest(),)


def test_only_what_was_offered_can_be_read_or_downloaded(api: Api, offered: Offered) -> None:
    poll(offered.client, offered.controller)  # registered in group g1
    elsewhere = api.deploy(api.raw(offered.product, "1.0.2")[0], offered.product, "g2")
    prefix = base(offered.controller)
    for path in (
        f"{prefix}/deploymentBase/{elsewhere}",
        f"{prefix}/softwaremodules/{elsewhere}/artifacts/update.swu",
        f"{prefix}/softwaremodules/{elsewhere}/artifacts/update.swu.MD5SUM",
    ):
        answer = offered.client.get(path)
        assert answer.status_code in (403, 404), (path, answer.text)
    assert offered.client.get(f"{prefix}/deploymentBase/999999").status_code == 404
    assert offered.client.get(f"{prefix}/softwaremodules/999999/artifacts/x").status_code == 404
    assert offered.client.get(f"{prefix}/installedBase/{offered.deployment}").status_code == 404
    bad = offered.client.get(f"{prefix}/deploymentBase/abc")
    one_line_422(bad)


# --- feedback ---------------------------------------------------------------------------------


def test_feedback_is_counted_and_success_sets_the_version(api: Api, offered: Offered) -> None:
    client, controller, number = offered.client, offered.controller, offered.deployment
    url = f"{links(client, controller)['deploymentBase']}/feedback"
    steps = [
        # SWUpdate sends the id as a number, with a time and progress
        (
            feedback("proceeding", id=number, time="20240101T120000"),
            {"Downloading": 1},
        ),
        (feedback("resumed"), {"Downloading": 1}),
        (feedback("downloaded", id=str(number)), {"Applying": 1}),
    ]
    for body, counts in steps:
        answer = client.post(url, json=body)
        assert answer.status_code == 200, answer.text
        assert api.counts(number) == counts
    progress = feedback("closed", "success", ["installed"])
    progress["status"]["result"]["progress"] = {"cnt": 2, "of": 2}
    assert client.post(url, json=progress).status_code == 200
    assert api.counts(number) == {"Applied": 1}
    device = api.device(controller)
    assert (device["version"], device["status"]) == ("1.0.1", "applied")
    # a closed action is not offered again; installedBase names it
    hrefs = links(client, controller)
    assert "deploymentBase" not in hrefs
    installed = client.get(hrefs["installedBase"])
    assert installed.status_code == 200
    assert installed.json()["id"] == str(number)
    assert installed.json()["deployment"]["chunks"][0]["version"] == "1.0.1"


@pytest.mark.parametrize(
    ("body", "label", "error"),
    [
        (feedback("closed", "failure", ["", "ERROR: bad  signature", "x"]), "Error", None),
        (feedback("rejected"), "Error", "rejected"),
        (feedback("closed", "none"), "Unknown", None),
    ],
)
def test_a_closed_action_is_not_offered_again(
    api: Api, offered: Offered, body: dict[str, Any], label: str, error: str | None
) -> None:
    client, controller = offered.client, offered.controller
    url = f"{links(client, controller)['deploymentBase']}/feedback"
    assert client.post(url, json=body).status_code == 200
    assert api.counts(offered.deployment) == {label: 1}
    device = api.device(controller)
    assert device["version"] is None  # nothing applied
    if label == "Error":
        assert device["error"] == (error or "ERROR: bad signature")
    assert "deploymentBase" not in links(client, controller)


def test_malformed_feedback_is_422_and_an_unknown_action_404(api: Api, offered: Offered) -> None:
    client = offered.client
    url = f"{links(client, offered.controller)['deploymentBase']}/feedback"
    assert "status" in one_line_422(client.post(url, json={"id": "1"}))
    assert "execution" in one_line_422(client.post(url, json=feedback("bogus")))
    one_line_422(client.post(url, json=feedback("closed", "maybe")))
    numbers = {"status": {"execution": "closed", "details": [1, 2]}}
    one_line_422(client.post(url, json=numbers))
    one_line_422(client.post(url, json={"status": {"execution": "closed", "details": "x"}}))
    one_line_422(client.post(url, content=b"[", headers={"content-type": "application/json"}))
    assert api.counts(offered.deployment) == {}  # nothing was recorded
    unknown = client.post(
        f"{base(offered.controller)}/deploymentBase/999999/feedback", json=feedback("proceeding")
    )
    assert unknown.status_code == 404


def test_swupdates_feedback_is_read_as_it_means_it(api: Api, offered: Offered) -> None:
    """SWUpdate sends up to 48 log lines (kept: the first 16, cut at 512 characters) and writes
    failure details into the JSON unescaped: a quote in one makes the body invalid JSON, and
    the failure must count all the same."""
    client, number = offered.client, offered.deployment
    url = f"{links(client, offered.controller)['deploymentBase']}/feedback"
    lines = ["y" * 600] + [f"log line {i} " + "x" * 900 for i in range(47)]  # past 8 KiB
    log_flush = feedback("proceeding", details=lines, id=number, time="20261204T153045")
    log_flush["status"]["result"]["progress"] = {"cnt": 0, "of": 0}
    anonymous = httpx.post(url, json=log_flush)  # only a caller with credentials may send more
    assert anonymous.status_code == 413, anonymous.text
    answer = client.post(url, json=log_flush)
    assert answer.status_code == 200, answer.text
    assert api.counts(number) == {"Downloading": 1}
    failure = (
        f'{{"id": {number}, "time": "20261204T153045", "status": {{"result": {{"progress": '
        '{"cnt": 0, "of": 1}, "finished": "failure"}, "execution": "closed", "details": '
        '[ "ERROR : handler "rawfile" failed", "ERROR : Installation failed" ]}}'
    ).encode()
    with pytest.raises(ValueError, match="Expecting"):
        json.loads(failure)
    answer = client.post(url, content=failure, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert api.counts(number) == {"Error": 1}
    assert api.device(offered.controller)["error"] == 'ERROR : handler "rawfile" failed'


# --- cancelAction -----------------------------------------------------------------------------


@dataclass
class Cancelled:
    offered: Offered
    rollout: int
    href: str


@pytest.fixture
def cancelled(api: Api) -> Iterator[Cancelled]:
    """A device downloading a rollout's deployment, and the rollout aborted."""
    product = api.product()
    artifact, data = api.raw(product)
    created = api.admin.post(
        "/api/v1/rollouts",
        json={
            "deployment": {"artifact_id": artifact["id"], "product": product, "group": "g1"},
            "phases": [{"percent": 100}],
        },
    )
    assert created.status_code == 201, created.text
    rollout, number = created.json()["id"], created.json()["deployment_id"]
    with api.client("GatewayToken", api.gateway(product)) as client:
        controller = serial()
        href = links(client, controller)["deploymentBase"]
        assert client.post(f"{href}/feedback", json=feedback("proceeding")).status_code == 200
        assert api.counts(number) == {"Downloading": 1}
        aborted = api.admin.post(f"/api/v1/rollouts/{rollout}/abort", json={"reason": "bad"})
        assert aborted.status_code == 200, aborted.text
        hrefs = links(client, controller)
        assert set(hrefs) == {"cancelAction", "configData"}
        offered = Offered(product, controller, client, number, artifact, data)
        yield Cancelled(offered, rollout, hrefs["cancelAction"])


def test_an_aborted_rollout_is_a_cancel_action_until_confirmed(
    api: Api, cancelled: Cancelled
) -> None:
    offered = cancelled.offered
    client, number = offered.client, offered.deployment
    assert cancelled.href.endswith(f"/cancelAction/0{number}")  # Zephyr 4.1+ skips a digit
    answer = client.get(cancelled.href)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"id": str(number), "cancelAction": {"stopId": str(number)}}
    assert client.get(f"{base(offered.controller)}/cancelAction/{number}").json() == answer.json()
    # it keeps asking while the device is still at it
    assert client.post(f"{cancelled.href}/feedback", json=feedback("proceeding")).status_code == 200
    assert "cancelAction" in links(client, offered.controller)
    # SWUpdate confirms with closed/success, the stop id as a number
    confirm = feedback("closed", "success", ["cancellation acknowledged."], id=number, time="x")
    assert client.post(f"{cancelled.href}/feedback", json=confirm).status_code == 200
    assert set(links(client, offered.controller)) == {"configData"}
    assert client.get(cancelled.href).status_code == 404
    assert api.counts(number) == {"Interrupted": 1}
    assert api.device(offered.controller)["error"] == "cancelled"
    # a repeated confirmation changes nothing
    assert client.post(f"{cancelled.href}/feedback", json=confirm).status_code == 200
    assert set(links(client, offered.controller)) == {"configData"}
    # the action can still be read, but its file is not served any more
    file = f"{base(offered.controller)}/softwaremodules/{number}/artifacts/update.swu"
    assert client.get(f"{base(offered.controller)}/deploymentBase/{number}").status_code == 200
    assert client.get(file).status_code == 403


def test_a_download_without_feedback_is_cancelled_too(api: Api) -> None:
    """Zephyr's client sends no feedback before it has installed: its first byte makes it
    downloading, so an abort is a cancelAction for it; its closed/failure (the action was
    installed already) refuses the cancel: the link goes and the action goes on, as in
    hawkBit, until the device closes it."""
    product = api.product()
    artifact, data = api.raw(product)
    created = api.admin.post(
        "/api/v1/rollouts",
        json={
            "deployment": {"artifact_id": artifact["id"], "product": product},
            "phases": [{"percent": 100}],
        },
    )
    assert created.status_code == 201, created.text
    rollout, number = created.json()["id"], created.json()["deployment_id"]
    controller = serial()
    with api.client("GatewayToken", api.gateway(product, None)) as client:
        document = client.get(links(client, controller)["deploymentBase"]).json()
        url = document["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download-http"]
        cut = client.get(url["href"], headers={"range": "bytes=0-999"})
        assert cut.content == data[:1000]
        assert api.counts(number) == {"Downloading": 1}
        assert api.admin.post(f"/api/v1/rollouts/{rollout}/abort", json={}).status_code == 200
        href = links(client, controller)["cancelAction"]
        assert client.get(url["href"], headers={"range": "bytes=1000-"}).status_code == 403
        body = {"status": {"execution": "closed", "result": {"finished": "failure"}}}
        assert client.post(f"{href}/feedback", json=body).status_code == 200
        assert api.device(controller)["error"] == "cancel rejected"
        going_on = links(client, controller)
        assert set(going_on) == {"configData", "deploymentBase"}
        assert going_on["deploymentBase"].endswith(f"/deploymentBase/{number}")
        rest = client.get(url["href"], headers={"range": "bytes=1000-"})
        assert rest.status_code == 206
        assert rest.content == data[1000:]
        closed = {"status": {"execution": "closed", "result": {"finished": "success"}}}
        assert client.post(f"{going_on['deploymentBase']}/feedback", json=closed).status_code == 200
        assert set(links(client, controller)) == {"configData", "installedBase"}
    assert api.counts(number) == {"Applied": 1}


def test_a_rejected_cancel_is_not_asked_again(api: Api, cancelled: Cancelled) -> None:
    offered = cancelled.offered
    answer = offered.client.post(f"{cancelled.href}/feedback", json=feedback("rejected"))
    assert answer.status_code == 200, answer.text
    assert "cancelAction" not in links(offered.client, offered.controller)
    assert api.device(offered.controller)["error"] == "cancel rejected"
    nothing = offered.client.post(
        f"{base(offered.controller)}/cancelAction/999999/feedback", json=feedback("canceled")
    )
    assert nothing.status_code == 404


@pytest.mark.integration
def test_the_poll_interval_is_checked(tmp_path: Path) -> None:
    argv = [str(BIN / "otakit"), "serve", "--data", str(tmp_path), "--port", "0"]
    refused = subprocess.run(
        [*argv, "--ddi-poll", "0"], capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode != 0
    assert "--ddi-poll must be 1 to 86399 seconds" in refused.stderr
    assert not (tmp_path / "otakit.db").exists()  # refused before anything was created


# --- the rules, without a server ---------------------------------------------------------------


def test_sleep_is_hours_minutes_seconds() -> None:
    assert ddi.sleep_text(300) == "00:05:00"
    assert ddi.sleep_text(3661) == "01:01:01"
    assert ddi.sleep_text(10**9) == "23:59:59"  # SWUpdate reads hours 0 to 23
    assert ddi.sleep_text(0) == "00:00:01"


@pytest.mark.parametrize(
    ("execution", "finished", "details", "expected"),
    [
        (Execution.PROCEEDING, Finished.NONE, [], ("downloading", None)),
        (Execution.SCHEDULED, Finished.NONE, [], ("downloading", None)),
        (Execution.RESUMED, Finished.NONE, [], ("downloading", None)),
        (Execution.DOWNLOAD, Finished.NONE, [], ("downloading", None)),
        (Execution.DOWNLOADED, Finished.NONE, [], ("applying", None)),
        (Execution.CLOSED, Finished.SUCCESS, ["ok"], ("applied", None)),
        (Execution.CLOSED, Finished.FAILURE, [], ("error", "failure")),
        (Execution.CLOSED, Finished.FAILURE, ["e" * 100], ("error", "e" * 64)),
        (Execution.CLOSED, Finished.NONE, [], ("unknown", None)),
        (Execution.REJECTED, Finished.NONE, [], ("error", "rejected")),
        (Execution.CANCELED, Finished.NONE, [], ("interrupted", "cancelled")),
    ],
)
def test_feedback_states(
    execution: Execution,
    finished: Finished,
    details: list[str],
    expected: tuple[str, str | None],
) -> None:
    assert ddi.status_of(execution, finished, details) == expected


def test_feedback_details_are_cut_not_refused() -> None:
    kept = ddi.bounded_details(["x" * 600] + ["y"] * 40)
    assert isinstance(kept, list)
    assert len(kept) == ddi.MAX_DETAILS
    assert kept[0] == "x" * ddi.MAX_DETAIL_CHARS
    assert ddi.bounded_details("not a list") == "not a list"  # refused by the model


def test_a_feedback_that_is_not_json_is_read_when_it_can_be() -> None:
    assert ddi.salvage_feedback(b'{"status": {"execution": "closed"}}') is None  # JSON already
    assert ddi.salvage_feedback(b"[") is None  # nothing to read
    fixed = ddi.salvage_feedback(
        b'{"status": {"result": {"finished": "failure"}, "execution": "closed", '
        b'"details": [ "a "b" c", "d" ]}}'
    )
    assert fixed is not None
    assert json.loads(fixed) == {
        "status": {
            "execution": "closed",
            "result": {"finished": "failure"},
            "details": ['a "b" c', "d"],
        }
    }


def test_configured_tags_keep_the_servers_own() -> None:
    tags = {"productType": "p", "deviceGroup": "g", "a": "1"}
    assert ddi.configured_tags(tags, "merge", {"b": "2", "deviceGroup": "x"}) == {
        **tags,
        "b": "2",
    }
    assert ddi.configured_tags(tags, "replace", {"c": "3"}) == {
        "productType": "p",
        "deviceGroup": "g",
        "c": "3",
    }
    assert ddi.configured_tags(tags, "remove", {"a": "", "productType": ""}) == {
        "productType": "p",
        "deviceGroup": "g",
    }
    many = {f"k{i}": "v" for i in range(ddi.MAX_ATTRIBUTES)}
    with pytest.raises(UnprocessableError):
        ddi.configured_tags({**tags, **many}, "merge", {"one": "more"})
