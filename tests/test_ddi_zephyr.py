"""Contract tests: Zephyr's hawkBit client (``subsys/mgmt/hawkbit``) against a real ``otakit serve``.

:class:`Zephyr` does on the wire what that client does, written from its source (hawkbit.c and
lib/utils/json.c; docs/hawkbit.md sums them up), in two generations:

- ``old`` (Zephyr up to 3.5; 3.6 and 3.7 leave ``id`` out of their bodies): one pass per probe;
  the tenant is hard-wired ``DEFAULT``; the deploymentBase URL is rebuilt from the href's tail
  after ``deploymentBase/`` (49 characters at most), the download URL is the href from
  ``/DEFAULT/controller/v1`` on (199 at most); feedback bodies carry ``id`` (and ``time``).
- ``new`` (4.1 on, a state machine): after a cancel feedback, a configData or a deployment
  feedback it polls again in the same run; every URL is the href's path and query
  (``hawkbit_get_url``); ``CONFIG_HAWKBIT_TENANT``; feedback bodies are only ``status``; the
  cancel id is read one character past ``cancelAction/``.

Both parse JSON as Zephyr's ``json_obj_parse`` does (:func:`json_obj_parse`): only the fields of
its descriptors, each of the descriptor's type, no ``null`` anywhere, one chunk and one artifact
at most; a missing field is no parse error, but the checks after it (``bApp``, a 64-digit
SHA-256, a ``download-http`` href) fail as the client would. Every request goes to the configured
server (the host and port of an href are dropped), responses must be 200 with a Content-Length,
the file's SHA-256 is checked as ``flash_img_check`` does, and MCUboot (imgtool here) validates
the image before it "boots". otakit's own client code is not used.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image

from .server_harness import Server, start_server

KEY = SigningKey.generate("ecdsa-p256")
POLL = 90  # otakit serve --ddi-poll: config.polling.sleep "00:01:30"
SLOT1_SIZE = 0x60000  # frdm_k64f's slot1_partition
BOARD = "frdm_k64f"
JSON_TYPE = "application/json;charset=UTF-8"  # what Zephyr's client sends
MAX_STATES = 8  # state machine passes in one probe before we call it a loop

Generation = Literal["old", "new"]


# --- Zephyr's JSON parser ----------------------------------------------------------------------


class Rejected(Exception):
    """Where Zephyr's client stops with an error: ``status`` is its ``hawkbit_response``."""

    def __init__(self, status: str, why: str) -> None:
        super().__init__(f"{status}: {why}")
        self.status = status


@dataclass(frozen=True)
class Obj:
    """``JSON_OBJ_DESCR_OBJECT``: the fields Zephyr decodes (others are skipped)."""

    fields: Mapping[str, Descr]


@dataclass(frozen=True)
class ObjArray:
    """``JSON_OBJ_DESCR_OBJ_ARRAY``: at most ``max`` objects."""

    max: int
    element: Obj


Descr = Literal["string", "number"] | Obj | ObjArray

HREF = Obj({"href": "string"})
# json_ctl_res_descr
BASE_POLL = Obj(
    {
        "config": Obj({"polling": Obj({"sleep": "string"})}),
        "_links": Obj({"deploymentBase": HREF, "cancelAction": HREF, "configData": HREF}),
    }
)
# json_dep_res_descr; HAWKBIT_DEP_MAX_CHUNKS and HAWKBIT_DEP_MAX_CHUNK_ARTS are 1
ARTIFACT = Obj(
    {
        "filename": "string",
        "hashes": Obj({"sha1": "string", "md5": "string", "sha256": "string"}),
        "size": "number",
        "_links": Obj({"download-http": HREF, "md5sum-http": HREF}),
    }
)
DEPLOYMENT_BASE = Obj(
    {
        "id": "string",
        "deployment": Obj(
            {
                "download": "string",
                "update": "string",
                "chunks": ObjArray(
                    1,
                    Obj(
                        {
                            "part": "string",
                            "version": "string",
                            "name": "string",
                            "artifacts": ObjArray(1, ARTIFACT),
                        }
                    ),
                ),
            }
        ),
    }
)


def _metadata(why: str) -> Rejected:
    return Rejected("METADATA_ERROR", why)


def _no_exponent(text: str) -> float:
    if "e" in text.lower():  # json.c's lexer takes digits and '.' only
        raise _metadata(f"number {text} has an exponent")
    return float(text)


def _no_null(value: object, path: str) -> None:
    """json.c's ``element_token`` takes no null, in known and unknown fields alike."""
    if value is None:
        raise _metadata(f"{path} is null")
    if isinstance(value, dict):
        for key, item in value.items():
            _no_null(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _no_null(item, f"{path}[{i}]")


def _decode(value: object, descr: Descr, path: str) -> Any:
    if descr == "string":
        if not isinstance(value, str):
            raise _metadata(f"{path} is {type(value).__name__}, not a string")
        return value
    if descr == "number":  # decode_num: strtol of the token, which must end with it (an int32)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _metadata(f"{path} is {type(value).__name__}, not an integer")
        if not -(2**31) <= value < 2**31:
            raise _metadata(f"{path} does not fit an int32")
        return value
    if isinstance(descr, ObjArray):
        if not isinstance(value, list):
            raise _metadata(f"{path} is not an array")
        if len(value) > descr.max:
            raise _metadata(f"{path} has {len(value)} elements, room for {descr.max} (-ENOSPC)")
        return [_decode(item, descr.element, f"{path}[{i}]") for i, item in enumerate(value)]
    if not isinstance(value, dict):
        raise _metadata(f"{path} is not an object")
    # unknown keys are skipped (skip_field); a missing key is no error: it stays absent
    return {
        k: _decode(v, descr.fields[k], f"{path}.{k}") for k, v in value.items() if k in descr.fields
    }


def json_obj_parse(body: bytes, descr: Obj) -> dict[str, Any]:
    """The document as Zephyr's ``json_obj_parse`` with ``descr`` decodes it (only its fields);
    Rejected (METADATA_ERROR) where that returns an error."""
    try:
        doc = json.loads(body, parse_float=_no_exponent)
    except ValueError as exc:
        raise _metadata(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _metadata("not a JSON object")
    _no_null(doc, "$")
    decoded: dict[str, Any] = _decode(doc, descr, "$")
    return decoded


def strtol(text: str) -> int:
    """C's strtol(text, NULL, 10): the leading integer, 0 when there is none."""
    found = re.match(r"\s*([+-]?\d+)", text)
    return int(found.group(1)) if found else 0


def get_url(href: str) -> str:
    """``hawkbit_get_url`` (4.1+): from the first '/' after '//' on (path and query)."""
    at = href.find("//")
    slash = href.find("/", at + 2) if at >= 0 else -1
    if slash < 0:
        raise _metadata(f"unexpected href format: {href}")
    return href[slash:]


def _string_at(doc: Mapping[str, Any], *path: str) -> str | None:
    node: Any = doc
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, str) else None


# --- the client --------------------------------------------------------------------------------


@dataclass
class Zephyr:
    """One device with Zephyr's hawkBit client: ``probe()`` is ``hawkbit_probe()``; ``boot()``
    is the reboot after an installed update (MCUboot's test swap)."""

    server: str  # CONFIG_HAWKBIT_SERVER:CONFIG_HAWKBIT_PORT, as a base URL
    generation: Generation
    device_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])  # hwinfo, in hex
    tenant: str = "DEFAULT"  # CONFIG_HAWKBIT_TENANT (4.1+; older clients use DEFAULT)
    authorization: str | None = None  # "TargetToken otk_..." / "GatewayToken otk_..." / None
    action_id: int = 0  # settings "hawkbit/action_id": the action installed last
    poll_sleep: int = 5 * 60  # CONFIG_HAWKBIT_POLL_INTERVAL, until the server says otherwise
    slot1: bytes = b""  # the secondary slot
    running: bytes = b""  # the primary slot
    requests: list[str] = field(default_factory=list)
    deployment: dict[str, Any] = field(default_factory=dict)  # the last deploymentBase read

    @property
    def controller_id(self) -> str:
        return f"{BOARD}-{self.device_id}"

    @property
    def json_url(self) -> str:
        tenant = self.tenant if self.generation == "new" else "DEFAULT"
        return f"/{tenant}/controller/v1"

    @property
    def home(self) -> str:
        return f"{self.json_url}/{self.controller_id}"

    # -- HTTP, as send_request and response_cb do it

    def _client(self) -> httpx.Client:
        headers = {"authorization": self.authorization} if self.authorization else {}
        return httpx.Client(base_url=self.server, headers=headers, timeout=30)

    def _answer(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            status = "PERMISSION_ERROR" if response.status_code in (401, 403) else "METADATA_ERROR"
            raise Rejected(status, f"HTTP {response.status_code}: {response.text[:200]}")

    def _get_json(self, path: str, descr: Obj) -> dict[str, Any]:
        self.requests.append(f"GET {path}")
        with self._client() as client:
            response = client.get(path)
        self._answer(response)
        length = response.headers.get("content-length")
        if length is None or int(length) != len(response.content):  # "HTTP response len mismatch"
            raise _metadata(f"Content-Length {length} for a body of {len(response.content)}")
        return json_obj_parse(response.content, descr)

    def _send(self, method: str, path: str, body: Mapping[str, Any]) -> None:
        self.requests.append(f"{method} {path}")
        content = json.dumps(body, separators=(",", ":"))  # json_obj_encode_buf is compact
        with self._client() as client:
            response = client.request(
                method, path, content=content, headers={"content-type": JSON_TYPE}
            )
        self._answer(response)

    # -- the resources

    def _status(self, finished: str) -> dict[str, Any]:
        return {"execution": "closed", "result": {"finished": finished}}

    def _update_sleep(self, base: Mapping[str, Any]) -> None:
        sleep = _string_at(base, "config", "polling", "sleep")
        if sleep is None or len(sleep) != 8:  # HAWKBIT_SLEEP_LENGTH; else "Invalid poll sleep"
            return
        seconds = strtol(sleep) * 3600 + strtol(sleep[3:]) * 60 + strtol(sleep[6:])
        if seconds > 0:
            self.poll_sleep = seconds

    def _config_device(self, href: str) -> None:
        if self.generation == "new":
            body: dict[str, Any] = {"mode": "merge", "data": {"VIN": self.device_id}}
            self._send("PUT", get_url(href), body)
        else:
            body = {
                "mode": "merge",
                "data": {"VIN": self.device_id, "hwRevision": "3"},
                "id": "",
                "time": "",
                "status": self._status("success"),
            }
            self._send("PUT", f"{self.home}/configData", body)

    def _cancel(self, href: str) -> None:
        helper = href.find("cancelAction/")
        if helper < 0:
            raise _metadata(f"missing cancelAction/ in href {href}")
        if self.generation == "new":
            # hawkbit_find_cancel_action_id: helper += sizeof("cancelAction/"), one past the '/'
            cancel_id = strtol(href[helper + len("cancelAction/") + 1 :])
            if cancel_id <= 0:
                raise _metadata(f"invalid cancel action id in {href}")
            finished = "failure" if cancel_id == self.action_id else "success"
            self._send("POST", f"{get_url(href)}/feedback", {"status": self._status(finished)})
            return
        tail = href[helper:]
        if len(tail) > 49:  # CANCEL_BASE_SIZE - 1
            raise Rejected("METADATA_ERROR", f"cancelAction {tail} is too big")
        tokens = [t for t in tail.split("/") if t]  # strtok(helper, "/") twice
        cancel_id = strtol(tokens[1]) if len(tokens) > 1 else 0
        if cancel_id <= 0:
            raise _metadata(f"invalid cancel action id in {href}")
        body = {"id": str(cancel_id), "time": "", "status": self._status("success")}
        self._send("POST", f"{self.home}/{tail}/feedback", body)

    def _report(self, action_id: int) -> None:
        body: dict[str, Any] = {"status": self._status("success")}
        if self.generation == "old":
            body = {"id": str(action_id), **body}
        self._send("POST", f"{self.home}/deploymentBase/{action_id}/feedback", body)

    def _deployment(self, href: str) -> tuple[dict[str, Any], int]:
        if self.generation == "new":
            path = get_url(href)
        else:  # hawkbit_find_deployment_base
            helper = href.find("deploymentBase/")
            if helper < 0:
                raise _metadata(f"missing deploymentBase/ in href {href}")
            if len(href) - helper > 49:  # DEPLOYMENT_BASE_SIZE - 1
                raise Rejected("METADATA_ERROR", f"deploymentBase {href[helper:]} is too big")
            path = f"{self.home}/{href[helper:]}"
        dep = self._get_json(path, DEPLOYMENT_BASE)
        self.deployment = dep
        if "id" not in dep:  # strtol(NULL): the client would crash
            raise _metadata("deploymentBase has no id")
        action_id = strtol(dep["id"])
        if action_id <= 0 if self.generation == "new" else action_id < 0:
            raise _metadata(f"invalid action id {dep['id']!r}")
        return dep, action_id

    def _parse_deployment(self, dep: Mapping[str, Any]) -> tuple[str, bytes]:
        """hawkbit_parse_deployment: the download path and the SHA-256 to expect."""
        chunks = dep.get("deployment", {}).get("chunks", [])
        if len(chunks) != 1:
            raise _metadata(f"expecting 1 chunk (got {len(chunks)})")
        chunk = chunks[0]
        if chunk.get("part") != "bApp":
            raise _metadata(f"only part 'bApp' is supported; got {chunk.get('part')}")
        artifacts = chunk.get("artifacts", [])
        if len(artifacts) != 1:
            raise _metadata(f"expecting 1 artifact (got {len(artifacts)})")
        artifact = artifacts[0]
        sha256 = artifact.get("hashes", {}).get("sha256", "")
        try:
            digest = bytes.fromhex(sha256[:64])  # hex2bin(sha256, 64, ...) must give 32 bytes
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise _metadata(f"hashes.sha256 {sha256!r} is not 64 hex digits")
        if artifact.get("size", 0) > SLOT1_SIZE:
            raise Rejected("METADATA_ERROR", "artifact file size too big")
        href = _string_at(artifact, "_links", "download-http", "href")
        if href is None:
            raise _metadata("missing expected download-http href")
        if self.generation == "new":
            return get_url(href), digest
        helper = href.find("/DEFAULT/controller/v1")
        if helper < 0:
            raise _metadata(f"unexpected download-http href format: {href}")
        if len(href) - helper > 199:  # DOWNLOAD_HTTP_SIZE - 1
            raise Rejected("METADATA_ERROR", "download-http is too big")
        return href[helper:], digest

    def _download(self, dep: Mapping[str, Any], action_id: int, cut_after: int | None) -> str:
        path, digest = self._parse_deployment(dep)
        self.requests.append(f"GET {path}")
        data = bytearray()
        with self._client() as client, client.stream("GET", path) as response:
            self._answer(response)
            if not response.headers.get("content-length"):  # progress divides by it
                raise Rejected("DOWNLOAD_ERROR", "no Content-Length")
            for piece in response.iter_bytes():
                data += piece
                if cut_after is not None and len(data) >= cut_after:
                    raise Rejected("NETWORKING_ERROR", f"connection lost after {len(data)} bytes")
        if len(data) > SLOT1_SIZE:  # flash_img_buffered_write runs off the slot
            raise Rejected("DOWNLOAD_ERROR", "the image does not fit the slot")
        if hashlib.sha256(data).digest() != digest:  # flash_img_check
            raise Rejected("DOWNLOAD_ERROR", "failed to validate stored firmware")
        self.slot1 = bytes(data)
        self.action_id = action_id  # hawkbit_device_acid_update
        return "UPDATE_INSTALLED"

    # -- one probe

    def probe(self, *, cut_after: int | None = None) -> str:
        """One ``hawkbit_probe()``: its result (UPDATE_INSTALLED, NO_UPDATE, OK, CANCEL_UPDATE)
        or the error status it ends with (``cut_after``: the connection drops after that many
        bytes of the file)."""
        try:
            return (
                self._probe_new(cut_after)
                if self.generation == "new"
                else self._probe_old(cut_after)
            )
        except Rejected as exc:
            return exc.status

    def _probe_old(self, cut_after: int | None) -> str:
        base = self._get_json(self.home, BASE_POLL)
        self._update_sleep(base)
        cancel = _string_at(base, "_links", "cancelAction", "href")
        if cancel is not None:
            self._cancel(cancel)
            return "CANCEL_UPDATE"
        config = _string_at(base, "_links", "configData", "href")
        if config is not None:
            self._config_device(config)
        href = _string_at(base, "_links", "deploymentBase", "href")
        if href is None:
            return "NO_UPDATE"
        dep, action_id = self._deployment(href)
        self._parse_deployment(dep)  # the old client parses before comparing
        if action_id == self.action_id:
            self._report(action_id)
            return "OK"
        return self._download(dep, action_id, cut_after)

    def _probe_new(self, cut_after: int | None) -> str:
        for _ in range(MAX_STATES):
            base = self._get_json(self.home, BASE_POLL)
            self._update_sleep(base)
            cancel = _string_at(base, "_links", "cancelAction", "href")
            config = _string_at(base, "_links", "configData", "href")
            href = _string_at(base, "_links", "deploymentBase", "href")
            if cancel is not None:
                self._cancel(cancel)
            elif config is not None:
                self._config_device(config)
            elif href is not None:
                dep, action_id = self._deployment(href)
                if action_id != self.action_id:
                    return self._download(dep, action_id, cut_after)
                self._report(action_id)
            else:
                return "NO_UPDATE"
        raise AssertionError(f"the state machine would loop forever: {self.requests[-6:]}")

    def boot(self, validate: Callable[[bytes], None]) -> None:
        """Reboot after UPDATE_INSTALLED: MCUboot validates the secondary slot and swaps."""
        assert self.slot1, "nothing was installed"
        validate(self.slot1)
        self.running, self.slot1 = self.slot1, b""


# --- the parser is as strict as Zephyr's (no server) -------------------------------------------


def _document(**changes: Any) -> dict[str, Any]:
    artifact = {
        "filename": "app.img",
        "hashes": {"sha1": "a" * 40, "md5": "b" * 32, "sha256": "c" * 64},
        "size": 1234,
        "_links": {"download-http": {"href": "http://h:1/DEFAULT/controller/v1/x/a"}},
    }
    chunk = {"part": "bApp", "version": "1.0.0", "name": "app", "artifacts": [artifact]}
    doc: dict[str, Any] = {"id": "7", "deployment": {"download": "forced", "chunks": [chunk]}}
    doc.update(changes)
    return doc


_CHUNK = _document()["deployment"]["chunks"][0]
BAD_DOCUMENTS = {
    "a null in an unknown field": _document(extra=None),
    "a number id": _document(id=7),
    "two chunks": _document(deployment={"chunks": [_CHUNK, _CHUNK]}),
    "a fractional size": _document(
        deployment={"chunks": [{**_CHUNK, "artifacts": [{"size": 12.5}]}]}
    ),
    "a string size": _document(deployment={"chunks": [{**_CHUNK, "artifacts": [{"size": "12"}]}]}),
    "an exponent": _document(extra=1e30),
    "a boolean part": _document(deployment={"chunks": [{**_CHUNK, "part": True}]}),
}


@pytest.mark.unit
@pytest.mark.parametrize("what", sorted(BAD_DOCUMENTS))
def test_the_emulated_parser_fails_where_zephyrs_does(what: str) -> None:
    with pytest.raises(Rejected, match="METADATA_ERROR"):
        json_obj_parse(json.dumps(BAD_DOCUMENTS[what]).encode(), DEPLOYMENT_BASE)


@pytest.mark.unit
def test_the_emulated_parser_skips_unknown_fields_and_misses_none() -> None:
    good = _document(unknown={"nested": [1, "x", {"deep": True}]})
    parsed = json_obj_parse(json.dumps(good).encode(), DEPLOYMENT_BASE)
    assert "unknown" not in parsed  # skip_field
    assert parsed["deployment"]["chunks"][0]["artifacts"][0]["size"] == 1234
    assert "update" not in parsed["deployment"]  # missing: no error
    assert strtol("07") == 7
    assert strtol("") == 0
    assert strtol("12?c=3") == 12
    assert get_url("http://h:8080/DEFAULT/x?c=1") == "/DEFAULT/x?c=1"
    with pytest.raises(Rejected):
        get_url("/DEFAULT/relative")


# --- against otakit ----------------------------------------------------------------------------


def image(version: str, size: int = 24000) -> bytes:
    payload = random.Random(f"zephyr/{version}").randbytes(size)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


@dataclass
class Site:
    """A running otakit server that trusts KEY, and the admin's helpers."""

    server: Server
    admin: httpx.Client
    key_file: Path
    imgtool: Callable[..., Any]

    def product(self, **settings: Any) -> str:
        name = f"z-{uuid.uuid4().hex[:8]}"
        answer = self.admin.put(f"/api/v1/products/{name}", json={"board": BOARD, **settings})
        assert answer.status_code == 200, answer.text
        return name

    def upload(self, data: bytes, product: str, name: str = "zephyr.signed.bin") -> str:
        answer = self.admin.post(
            "/api/v1/artifacts",
            params={"name": name, "product": product},
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        assert answer.status_code in (200, 201), answer.text
        artifact_id: str = answer.json()["id"]
        return artifact_id

    def deploy(self, artifact_id: str, product: str, group: str | None = "g") -> int:
        body = {"artifact_id": artifact_id, "product": product}
        if group is not None:
            body["group"] = group
        answer = self.admin.post("/api/v1/deployments", json=body)
        assert answer.status_code == 201, answer.text
        number: int = answer.json()["id"]
        return number

    def register(self, serial: str, product: str, group: str = "g") -> str:
        """A device registered ahead of its first poll, and its token (TargetToken)."""
        body = {"product": product, "group": group, "version": "1.0.0", "board": BOARD}
        assert self.admin.put(f"/api/v1/devices/{serial}", json=body).status_code == 200
        return self.token("device", device=serial)

    def token(self, role: str, **body: str) -> str:
        """A token as ``otakit token create --role ROLE`` makes it (over the management API)."""
        answer = self.admin.post("/api/v1/tokens", json={"role": role, **body})
        assert answer.status_code == 201, answer.text
        token: str = answer.json()["token"]
        return token

    def counts(self, deployment: int) -> dict[str, int]:
        answer = self.admin.get(f"/api/v1/deployments/{deployment}")
        assert answer.status_code == 200, answer.text
        counts: dict[str, int] = answer.json()["counts"]
        return counts

    def device(self, serial: str) -> dict[str, Any]:
        answer = self.admin.get(f"/api/v1/devices/{serial}")
        assert answer.status_code == 200, answer.text
        device: dict[str, Any] = answer.json()
        return device

    def mcuboot(self, expected: str) -> Callable[[bytes], None]:
        """MCUboot's check of the new image at boot, by imgtool, with the project's key."""

        def validate(data: bytes) -> None:
            path = self.server.data / f"slot1-{uuid.uuid4().hex[:8]}.bin"
            path.write_bytes(data)
            result = self.imgtool("verify", "-k", self.key_file, path)
            assert result.returncode == 0, result.stderr + result.stdout
            assert f"Image version: {expected}" in result.stdout

        return validate


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, imgtool: Callable[..., Any]) -> Iterator[Site]:
    data = tmp_path_factory.mktemp("ddi-zephyr")
    server = start_server(data, extra=("--ddi-poll", str(POLL)))
    try:
        admin = server.admin_client()
        pem = KEY.public_key.pem()
        added = admin.post(
            "/api/v1/keys", content=pem, headers={"content-type": "application/x-pem-file"}
        )
        assert added.status_code == 201, added.text
        key_file = data / "key.pem"
        key_file.write_bytes(pem)
        yield Site(server, admin, key_file, imgtool)
    finally:
        server.stop()


Auth = Literal["target", "gateway", "anonymous"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("generation", "auth"),
    [
        ("new", "target"),
        ("old", "target"),
        ("new", "gateway"),
        ("old", "gateway"),
        ("new", "anonymous"),
    ],
)
def test_zephyr_installs_the_image_and_otakit_counts_it_applied(
    site: Site, generation: Generation, auth: Auth
) -> None:
    product = site.product(anonymous=auth == "anonymous")
    v2 = image("2.1.0")
    # an anonymous device joins its product without a group
    deployment = site.deploy(
        site.upload(v2, product), product, None if auth == "anonymous" else "g"
    )
    zephyr = Zephyr(site.server.url, generation)
    if auth == "target":
        token = site.register(zephyr.controller_id, product)
        zephyr.authorization = f"TargetToken {token}"
    elif auth == "gateway":
        token = site.token("enroll", product=product, group="g")
        zephyr.authorization = f"GatewayToken {token}"
        zephyr.device_id = uuid.uuid4().hex  # a 16-byte hardware id: 42 characters in all
    else:
        zephyr.tenant = product  # the product named by the tenant
        zephyr.device_id = uuid.uuid4().hex

    assert zephyr.probe() == "UPDATE_INSTALLED", zephyr.requests
    assert zephyr.poll_sleep == POLL  # config.polling.sleep "00:01:30"
    assert zephyr.slot1 == v2
    # what the deploymentBase said is the file it got
    artifact = zephyr.deployment["deployment"]["chunks"][0]["artifacts"][0]
    assert artifact["size"] == len(v2)
    assert artifact["hashes"]["sha1"] == hashlib.sha1(v2).hexdigest()
    assert artifact["hashes"]["md5"] == hashlib.md5(v2).hexdigest()
    assert zephyr.deployment["id"] == str(deployment)
    # configData came first and its attribute is a tag now
    assert f"PUT {zephyr.home}/configData" in zephyr.requests
    shown = site.device(zephyr.controller_id)
    assert shown["tags"].get("VIN") == zephyr.device_id
    assert shown["product"] == product
    assert site.counts(deployment).get("Applied", 0) == 0

    zephyr.boot(site.mcuboot("2.1.0+0"))
    zephyr.requests.clear()
    # the next probe finds the same action and reports it closed/success (s_report)
    assert zephyr.probe() == ("NO_UPDATE" if generation == "new" else "OK"), zephyr.requests
    feedback = f"POST {zephyr.home}/deploymentBase/{deployment}/feedback"
    assert feedback in zephyr.requests
    assert site.counts(deployment)["Applied"] == 1
    assert site.device(zephyr.controller_id)["version"] == "2.1.0"
    # and then nothing: no configData again, no action, no feedback
    zephyr.requests.clear()
    assert zephyr.probe() == "NO_UPDATE"
    assert zephyr.requests == [f"GET {zephyr.home}"]


@pytest.mark.integration
def test_without_a_valid_token_zephyr_gets_a_permission_error(site: Site) -> None:
    product = site.product()
    zephyr = Zephyr(site.server.url, "new")
    token = site.register(zephyr.controller_id, product)
    other = Zephyr(site.server.url, "new", authorization=f"TargetToken {token}")
    assert other.probe() == "PERMISSION_ERROR"  # another device's token
    zephyr.authorization = f"TargetToken {token[:-4]}abcd"
    assert zephyr.probe() == "PERMISSION_ERROR"  # a wrong secret
    zephyr.authorization = None
    assert zephyr.probe() == "PERMISSION_ERROR"  # anonymous, where the product does not allow it
    zephyr.authorization = f"TargetToken {token}"
    assert zephyr.probe() == "NO_UPDATE"


@pytest.mark.integration
def test_a_raw_artifact_is_part_os_and_zephyr_refuses_it_without_downloading(site: Site) -> None:
    product = site.product(allow_raw=True)
    raw = random.Random("raw").randbytes(5000)
    answer = site.admin.post(
        "/api/v1/artifacts",
        params={"name": "update.swu", "product": product, "version": "3.0.0"},
        content=raw,
        headers={"content-type": "application/octet-stream"},
    )
    assert answer.status_code in (200, 201), answer.text
    site.deploy(answer.json()["id"], product)
    zephyr = Zephyr(site.server.url, "new")
    zephyr.authorization = f"TargetToken {site.register(zephyr.controller_id, product)}"
    assert zephyr.probe() == "METADATA_ERROR"
    assert zephyr.deployment["deployment"]["chunks"][0]["part"] == "os"
    assert not any("softwaremodules" in r for r in zephyr.requests)
    assert zephyr.slot1 == b""


def _rollout(site: Site, product: str, data: bytes) -> tuple[int, int]:
    """A rollout of ``data`` to the product's group ``g``, all at once; (rollout, deployment)."""
    artifact_id = site.upload(data, product)
    created = site.admin.post(
        "/api/v1/rollouts",
        json={
            "deployment": {"artifact_id": artifact_id, "product": product, "group": "g"},
            "phases": [{"percent": 100}],
        },
    )
    assert created.status_code == 201, created.text
    return created.json()["id"], created.json()["deployment_id"]


@pytest.mark.integration
@pytest.mark.parametrize("generation", ["new", "old"])
def test_an_aborted_rollout_is_a_cancel_zephyr_confirms(site: Site, generation: Generation) -> None:
    product = site.product()
    v3 = image("3.0.0", size=60000)
    rollout, deployment = _rollout(site, product, v3)
    zephyr = Zephyr(site.server.url, generation)
    zephyr.authorization = f"TargetToken {site.register(zephyr.controller_id, product)}"
    # the link drops mid-download: nothing is installed, the device retries on its next poll
    assert zephyr.probe(cut_after=8192) == "NETWORKING_ERROR", zephyr.requests
    assert zephyr.action_id == 0
    assert zephyr.slot1 == b""
    assert site.counts(deployment).get("Downloading", 0) == 1

    aborted = site.admin.post(f"/api/v1/rollouts/{rollout}/abort", json={"reason": "bad build"})
    assert aborted.status_code == 200, aborted.text
    zephyr.requests.clear()
    expected = "NO_UPDATE" if generation == "new" else "CANCEL_UPDATE"
    assert zephyr.probe() == expected, zephyr.requests
    assert any(r.startswith("POST") and "cancelAction" in r for r in zephyr.requests)
    assert not any("softwaremodules" in r for r in zephyr.requests)
    counts = site.counts(deployment)
    assert counts.get("Interrupted", 0) == 1, counts
    # the cancel is over: the next probe has nothing to do
    zephyr.requests.clear()
    assert zephyr.probe() == "NO_UPDATE"
    assert zephyr.requests == [f"GET {zephyr.home}"]


@pytest.mark.integration
def test_a_cancel_zephyr_refuses_after_the_install_still_ends_applied(site: Site) -> None:
    """Zephyr 4.1+ had the whole image when the rollout was aborted: it refuses the cancel
    (closed/failure: the action is the one it installed) and polls again at once. As in hawkBit,
    a refused cancel leaves the action going, so it finds the action again, reports it
    closed/success (its action id is the one it installed) and counts Applied; no loop."""
    product = site.product()
    v4 = image("4.0.0")
    rollout, deployment = _rollout(site, product, v4)
    zephyr = Zephyr(site.server.url, "new")
    zephyr.authorization = f"TargetToken {site.register(zephyr.controller_id, product)}"
    assert zephyr.probe() == "UPDATE_INSTALLED", zephyr.requests
    assert site.counts(deployment)["Downloading"] == 1

    aborted = site.admin.post(f"/api/v1/rollouts/{rollout}/abort", json={"reason": "too late"})
    assert aborted.status_code == 200, aborted.text
    zephyr.requests.clear()
    assert zephyr.probe() == "NO_UPDATE", zephyr.requests
    cancels = [r for r in zephyr.requests if r.startswith("POST") and "cancelAction" in r]
    assert cancels == [f"POST {zephyr.home}/cancelAction/0{deployment}/feedback"]
    assert f"POST {zephyr.home}/deploymentBase/{deployment}/feedback" in zephyr.requests
    assert not any("softwaremodules" in r for r in zephyr.requests)  # nothing downloaded again
    assert site.counts(deployment)["Applied"] == 1
    assert site.device(zephyr.controller_id)["version"] == "4.0.0"
    zephyr.boot(site.mcuboot("4.0.0+0"))
    zephyr.requests.clear()
    assert zephyr.probe() == "NO_UPDATE"
    assert zephyr.requests == [f"GET {zephyr.home}"]
