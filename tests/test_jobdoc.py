"""The JSON job document and MQTT messages (protocols.md §1, §3)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from otakit.device.core.job import check_job
from otakit.errors import (
    InvalidVersionError,
    MalformedJobDocError,
    NotAJobDocError,
    OtakitError,
    VersionFormatError,
    WrongBoardError,
)
from otakit.protocol.jobdoc import (
    CONNECTIONS,
    FIELD_LIMITS,
    MAX_DOCUMENT_BYTES,
    MAX_VALUE_BYTES,
    NO_UPDATE_AVAILABLE,
    RESULT_RECEIVED,
    UPDATE_AVAILABLE,
    JobDocument,
    check_stored_value,
    no_update,
    parse_job_document,
    result_received,
    to_json,
    update_available,
)
from otakit.protocol.version import FirmwareVersion

BOARD = "CY8CPROTO_062_4343W"

# The HTTP example of §1, as the original library documents it, with the Message its shipped
# ota_update.json files carry.
HTTP_EXAMPLE = b"""{
  "Message":"Update Available",
  "Manufacturer":"Express Widgits Corporation",
  "ManufacturerId":"EWCO",
  "Product":"Easy Widgit",
  "SerialNumber":"ABC213450001",
  "Version":"1.76.0",
  "Board":"CY8CPROTO_062_4343W",
  "Connection":"HTTP",
  "Server":"<server_URL>",
  "Port":"80",
  "File":"/<OTA_image_file_name>"
}"""

# The MQTT example as the original library ships it (scripts/ota_update.json).
MQTT_EXAMPLE = b"""{
  "Message":"Update Available",
  "Manufacturer":"Express Widgits Corporation",
  "ManufacturerId":"EWCO",
  "Product":"Easy Widgit",
  "SerialNumber":"ABC213450001",
  "Board":"CY8CPROTO_062_4343W",
  "Version":"1.6.0",
  "Connection":"MQTT",
  "Broker":"",
  "Port":"8883",
  "UniqueTopicName":"replace"
}
"""


def doc_json(**fields: object) -> bytes:
    return json.dumps(fields).encode()


# --- the examples --------------------------------------------------------------------------


def test_http_example_parses() -> None:
    doc = parse_job_document(HTTP_EXAMPLE)
    assert doc == JobDocument(
        message=UPDATE_AVAILABLE,
        manufacturer="Express Widgits Corporation",
        manufacturer_id="EWCO",
        product="Easy Widgit",
        serial_number="ABC213450001",
        version="1.76.0",
        board=BOARD,
        connection="HTTP",
        server="<server_URL>",
        port="80",
        file="/<OTA_image_file_name>",
    )
    assert doc.firmware_version == FirmwareVersion(1, 76, 0)
    assert doc.port_number == 80
    assert doc.host == "<server_URL>"
    check_job(doc, board=BOARD, current_version="1.75.9")


def test_mqtt_example_parses() -> None:
    doc = parse_job_document(MQTT_EXAMPLE.decode())
    assert doc.connection == "MQTT"
    assert doc.broker == ""
    assert doc.host == ""  # the broker the job came from
    assert doc.unique_topic_name == "replace"
    assert doc.port_number == 8883


def test_http_example_writes_back_compact_in_fixed_order() -> None:
    assert to_json(parse_job_document(HTTP_EXAMPLE)) == (
        b'{"Message":"Update Available","Manufacturer":"Express Widgits Corporation",'
        b'"ManufacturerId":"EWCO","Product":"Easy Widgit","SerialNumber":"ABC213450001",'
        b'"Version":"1.76.0","Board":"CY8CPROTO_062_4343W","Connection":"HTTP","Port":"80",'
        b'"Server":"<server_URL>","File":"/<OTA_image_file_name>"}'
    )


def test_readme_example_without_message_is_refused() -> None:
    legacy = json.loads(HTTP_EXAMPLE)
    del legacy["Message"]
    with pytest.raises(MalformedJobDocError, match="no Message"):
        parse_job_document(json.dumps(legacy))


# --- writing -------------------------------------------------------------------------------


def test_http_job_keeps_empty_server_and_port() -> None:
    doc = update_available(version="1.2.3", board=BOARD, connection="HTTP", file="/a.bin")
    assert doc.to_json() == (
        b'{"Message":"Update Available","Version":"1.2.3","Board":"CY8CPROTO_062_4343W",'
        b'"Connection":"HTTP","Port":"","Server":"","File":"/a.bin"}'
    )
    assert doc.port_number is None


def test_mqtt_job_keeps_empty_broker_and_port() -> None:
    doc = update_available(
        version=FirmwareVersion(1, 2, 3, 9),
        board=BOARD,
        connection="MQTT",
        port=1883,
        unique_topic_name="OTAUpdate/CY8CPROTO_062_4343W/OTAImage/42",
    )
    assert doc.version == "1.2.3"  # a job carries no build number
    assert doc.to_json() == (
        b'{"Message":"Update Available","Version":"1.2.3","Board":"CY8CPROTO_062_4343W",'
        b'"Connection":"MQTT","Port":"1883","Broker":"",'
        b'"UniqueTopicName":"OTAUpdate/CY8CPROTO_062_4343W/OTAImage/42"}'
    )


def test_mqtt_job_without_unique_topic_uses_direct_topic() -> None:
    doc = update_available(version="1.2.3", board=BOARD, connection="MQTT")
    assert parse_job_document(doc.to_json()).unique_topic_name == ""


def test_no_update_omits_empty_fields() -> None:
    doc = no_update(serial_number="ABC1", board=BOARD, version="1.0.0")
    assert to_json(doc) == (
        b'{"Message":"No Update Available","SerialNumber":"ABC1","Version":"1.0.0",'
        b'"Board":"CY8CPROTO_062_4343W"}'
    )
    assert parse_job_document(to_json(doc)) == doc
    assert to_json(JobDocument(message=NO_UPDATE_AVAILABLE)) == b'{"Message":"No Update Available"}'


def test_result_received() -> None:
    doc = result_received(unique_topic_name="OTAUpdate/B/OTAImage/7")
    assert doc.message == RESULT_RECEIVED
    assert parse_job_document(doc.to_json()) == doc


def test_non_ascii_is_written_as_utf8() -> None:
    doc = no_update(manufacturer="Müller ⚙")
    assert "Müller ⚙".encode() in doc.to_json()
    assert parse_job_document(doc.to_json()) == doc


def test_extra_keys_come_last_in_order_seen() -> None:
    doc = JobDocument(message="Request Data Chunk", extra=(("Size", "-1"), ("Filename", "a.bin")))
    assert to_json(doc) == b'{"Message":"Request Data Chunk","Size":"-1","Filename":"a.bin"}'


@pytest.mark.parametrize(
    "doc",
    [
        JobDocument(),  # no Message
        JobDocument(message=UPDATE_AVAILABLE, board=BOARD, connection="MQTT"),  # no Version
        JobDocument(message=UPDATE_AVAILABLE, version="1.0.0", connection="MQTT"),  # no Board
        JobDocument(message=UPDATE_AVAILABLE, version="1.0.0", board=BOARD),  # no Connection
        JobDocument(message=UPDATE_AVAILABLE, version="1.0.0", board=BOARD, connection="HTTPS"),
        JobDocument(message=UPDATE_AVAILABLE, version="1.0", board=BOARD, connection="MQTT"),
        JobDocument(message="x", connection="mqtt"),  # to_json writes only canonical names
        JobDocument(message="x", port="80a"),
        JobDocument(message="x", port=80),  # type: ignore[arg-type]
        JobDocument(message="x", extra=(("board", "B"),)),  # collides with a known key
        JobDocument(message="x", extra=(("A", "1"), ("a", "2"))),
        JobDocument(message="x", extra=(("A", 1),)),  # type: ignore[arg-type]
        JobDocument(message="x", extra=[("A", "1")]),  # type: ignore[arg-type]
        JobDocument(message="x", board="\ud800"),
        JobDocument(message="x", board="B\x00"),
        JobDocument(message="x", extra=(("\ud800", "1"),)),
    ],
)
def test_to_json_refuses_invalid_documents(doc: JobDocument) -> None:
    with pytest.raises(MalformedJobDocError):
        to_json(doc)


def test_update_available_validates() -> None:
    with pytest.raises(MalformedJobDocError, match="no File"):
        update_available(version="1.2.3", board=BOARD, connection="HTTP")
    with pytest.raises(MalformedJobDocError, match="Connection"):
        update_available(version="1.2.3", board=BOARD, connection="FTP", file="/a")


# --- reading -------------------------------------------------------------------------------


def test_keys_are_case_insensitive() -> None:
    doc = parse_job_document(
        b'{"MESSAGE":"Update Available","manufacturerID":"EWCO","version":"1.2.3",'
        b'"bOARD":"CY8CPROTO_062_4343W","connection":"HTTP","FILE":"/a.bin"}'
    )
    assert doc.manufacturer_id == "EWCO"
    assert doc.board == BOARD
    assert doc.file == "/a.bin"
    assert doc.get("MANUFACTURERID") == "EWCO"


@pytest.mark.parametrize("key", ["ManufacturerId", "ManufacturerID", "manufacturerid"])
def test_both_manufacturer_id_spellings(key: str) -> None:
    assert parse_job_document(doc_json(Message="m", **{key: "EWCO"})).manufacturer_id == "EWCO"


def test_values_are_case_sensitive_except_connection() -> None:
    doc = parse_job_document(doc_json(Message="m", Board="cy8cproto", Connection="https"))
    assert doc.board == "cy8cproto"
    assert doc.connection == "HTTPS"  # matched like the original, stored canonical


def test_only_ascii_keys_fold() -> None:
    # "BRO\u212aER" lower-cases to "broker" in Python, but not in the device's strncasecmp.
    doc = parse_job_document(doc_json(Message="m", **{"BRO\u212aER": "evil"}))
    assert doc.broker == ""
    assert doc.extra == (("BRO\u212aER", "evil"),)


def test_device_update_availability_message() -> None:
    # §3: what a device publishes; ProductID and BoardName are not job document keys.
    doc = parse_job_document(
        doc_json(
            Message="Update Availability",
            Manufacturer="EWCO",
            ManufacturerID="EWCO",
            ProductID="Easy",
            SerialNumber="ABC",
            BoardName=BOARD,
            Version="1.0.0",
            UniqueTopicName="OTAUpdate/B/OTAImage/12",
        )
    )
    assert doc.manufacturer_id == "EWCO"
    assert doc.get("productid") == "Easy"
    assert doc.get("BoardName") == BOARD
    assert doc.unique_topic_name == "OTAUpdate/B/OTAImage/12"
    assert parse_job_document(doc.to_json()) == doc


def test_request_data_chunk_message() -> None:
    doc = parse_job_document(
        doc_json(Message="Request Data Chunk", Filename="a.bin", Offset="4096", Size="-1")
    )
    assert (doc.get("filename"), doc.get("OFFSET"), doc.get("Size")) == ("a.bin", "4096", "-1")
    assert doc.get("Missing", "default") == "default"


def test_unknown_message_parses() -> None:
    assert parse_job_document(b'{"Message":"Success","File":"/a.bin"}').file == "/a.bin"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b" ",
        b"nope",
        b"{",
        b'{"Message":"x"',
        b'{"Message":"x"}{}',
        b"{'Message':'x'}",
        b"\xff\xfe{}",
        b'\xef\xbb\xbf{"Message":"x"}',  # UTF-8 BOM
        '{"Message":"x"}'.encode("utf-16"),
        b'{"Message":"\xc3"}',  # broken UTF-8
        b"[]",
        b'["Message"]',
        b'"Message"',
        b"1",
        b"null",
        b"true",
        b'{"Message":NaN}',
        b'{"Message":Infinity}',
        b"[" * 512 + b"]" * 512,
        b"[" * 1024,  # deeper than Python's recursion limit
        "{\ud800}",
        "\ud800",
    ],
)
def test_not_a_job_document(data: bytes | str) -> None:
    with pytest.raises(NotAJobDocError):
        parse_job_document(data)


def test_wrong_input_type_is_not_a_job_document() -> None:
    with pytest.raises(NotAJobDocError):
        parse_job_document(12)  # type: ignore[arg-type]


def test_bytearray_and_memoryview_are_accepted() -> None:
    assert parse_job_document(bytearray(HTTP_EXAMPLE)) == parse_job_document(HTTP_EXAMPLE)
    assert parse_job_document(memoryview(HTTP_EXAMPLE)) == parse_job_document(HTTP_EXAMPLE)


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (1, "a number"),
        (1.5, "a number"),
        (True, "a boolean"),
        (None, "null"),
        ([], "an array"),
        ({}, "an object"),
    ],
)
@pytest.mark.parametrize("key", ["Port", "Version", "Message", "Offset"])
def test_non_string_values_are_refused(key: str, value: object, kind: str) -> None:
    with pytest.raises(MalformedJobDocError, match=f"'{key}' holds {kind}"):
        parse_job_document(json.dumps({"Message": "m", key: value}))


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"Message": ""},
        {"Board": BOARD},
        {"Message": UPDATE_AVAILABLE, "Board": BOARD, "Connection": "HTTP", "File": "/a"},
        {"Message": UPDATE_AVAILABLE, "Version": "1.0.0", "Connection": "HTTP", "File": "/a"},
        {"Message": UPDATE_AVAILABLE, "Version": "1.0.0", "Board": BOARD, "File": "/a"},
        {"Message": UPDATE_AVAILABLE, "Version": "1.0.0", "Board": BOARD, "Connection": "HTTP"},
        {"Message": UPDATE_AVAILABLE, "Version": "1.0.0", "Board": BOARD, "Connection": "HTTPS"},
        {"Message": UPDATE_AVAILABLE, "Version": "1.0.0", "Board": BOARD, "Connection": "FTP"},
        {"Message": UPDATE_AVAILABLE, "Version": "1.0.0", "Board": BOARD, "Connection": ""},
        {"Message": UPDATE_AVAILABLE, "Version": "1.76", "Board": BOARD, "Connection": "MQTT"},
        {"Message": NO_UPDATE_AVAILABLE, "Version": "1.76"},
        {"Message": NO_UPDATE_AVAILABLE, "Connection": "MQTTS"},
        {"Message": "m", "Port": "0"},
        {"Message": "m", "Port": "65536"},
        {"Message": "m", "Port": "80a"},
        {"Message": "m", "Port": "-80"},
        {"Message": "m", "Port": " 80"},
        {"Message": "m", "Board": "B\x00evil"},
        {"Message": "m", "Board": "\ud800"},
        {"Message": "m", "\udc00": "x"},
        {"Message": "m", "x": "\udfff"},
    ],
)
def test_malformed_documents(fields: dict[str, str]) -> None:
    with pytest.raises(MalformedJobDocError):
        parse_job_document(json.dumps(fields))


def test_no_update_needs_only_a_message() -> None:
    assert parse_job_document(b'{"Message":"No Update Available"}') == no_update()


def test_mqtt_job_needs_no_file() -> None:
    doc = parse_job_document(
        doc_json(Message=UPDATE_AVAILABLE, Version="1.0.1", Board=BOARD, Connection="MQTT")
    )
    assert doc.file == ""
    assert doc.port_number is None


@pytest.mark.parametrize(
    "data",
    [
        b'{"Message":"m","Board":"a","Board":"b"}',
        b'{"Message":"m","Board":"a","BOARD":"b"}',
        b'{"Message":"m","ManufacturerId":"a","ManufacturerID":"b"}',
        b'{"Message":"m","Offset":"1","offset":"2"}',
        b'{"Message":"m","message":"n"}',
    ],
)
def test_duplicate_keys_are_refused(data: bytes) -> None:
    with pytest.raises(MalformedJobDocError, match="appears twice"):
        parse_job_document(data)


# --- limits --------------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid document of exactly ``size`` bytes (the padding is an extra key)."""
    head = b'{"Message":"No Update Available","Pad":"'
    tail = b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_document_of_exactly_1024_bytes_is_accepted() -> None:
    data = padded(MAX_DOCUMENT_BYTES)
    assert len(data) == 1024
    doc = parse_job_document(data)
    assert to_json(doc) == data


def test_document_of_1025_bytes_is_refused() -> None:
    data = padded(MAX_DOCUMENT_BYTES + 1)
    with pytest.raises(MalformedJobDocError, match="1025 bytes"):
        parse_job_document(data)
    fits = parse_job_document(padded(MAX_DOCUMENT_BYTES))
    ((pad_key, pad),) = fits.extra
    too_big = JobDocument(message=fits.message, extra=((pad_key, pad + "x"),))
    with pytest.raises(MalformedJobDocError, match="1025 bytes"):
        to_json(too_big)


def test_whitespace_counts_towards_the_limit() -> None:
    body = b'{"Message":"m"}'
    assert parse_job_document(body + b" " * (1024 - len(body))).message == "m"
    with pytest.raises(MalformedJobDocError):
        parse_job_document(body + b" " * (1025 - len(body)))


def test_huge_input_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedJobDocError):
        parse_job_document(b"[" * 10_000_000)


def test_field_limits() -> None:
    assert dict(FIELD_LIMITS) == {
        "Message": 32,
        "Manufacturer": 64,
        "ManufacturerId": 16,
        "Product": 64,
        "SerialNumber": 32,
        "Version": 16,
        "Board": 48,
        "Connection": 8,
        "Port": 8,
        "Server": 256,
        "File": 256,
        "Broker": 256,
        "UniqueTopicName": 256,
    }


FREE_TEXT_KEYS = [
    "Message",
    "Manufacturer",
    "ManufacturerId",
    "Product",
    "SerialNumber",
    "Board",
    "Server",
    "File",
    "Broker",
    "UniqueTopicName",
]


def test_a_value_leaves_room_for_the_terminator() -> None:
    assert dict(MAX_VALUE_BYTES) == {key: size - 1 for key, size in FIELD_LIMITS.items()}


@pytest.mark.parametrize("key", FREE_TEXT_KEYS)
def test_each_field_limit(key: str) -> None:
    longest = MAX_VALUE_BYTES[key]
    base = {"Message": NO_UPDATE_AVAILABLE}
    assert parse_job_document(json.dumps({**base, key: "a" * longest})).get(key) == "a" * longest
    # a value as long as the device's buffer leaves no room for its NUL
    with pytest.raises(MalformedJobDocError, match=f"{key} is {longest + 1} bytes"):
        parse_job_document(json.dumps({**base, key: "a" * (longest + 1)}))
    too_long: dict[str, Any] = {ATTRIBUTES[key]: "a" * (longest + 1)}  # a str field, by name
    with pytest.raises(MalformedJobDocError, match=f"{key} is {longest + 1} bytes"):
        to_json(replace(JobDocument(message="m"), **too_long))
    # the limit counts UTF-8 bytes, as the device stores them
    wide = "é" * ((longest + 1) // 2) + "a" * ((longest + 1) % 2)  # longest + 1 bytes
    with pytest.raises(MalformedJobDocError):
        parse_job_document(json.dumps({**base, key: wide}))


ATTRIBUTES = {
    **{key: key.lower() for key in FREE_TEXT_KEYS},
    "ManufacturerId": "manufacturer_id",
    "SerialNumber": "serial_number",
    "UniqueTopicName": "unique_topic_name",
}


def test_version_limit() -> None:
    assert parse_job_document(doc_json(Message="m", Version="123456.1234.123")).version
    with pytest.raises(MalformedJobDocError, match="Version is 16 bytes"):
        parse_job_document(doc_json(Message="m", Version="1234567.1234.123"))


def test_stored_values_are_printable_without_json_escapes() -> None:
    check_stored_value("Board", "CY8CPROTO_062_4343W")
    check_stored_value("Manufacturer", "Acme Ünïcode GmbH")
    for bad in ('say "hi"', "back\\slash", "tab\there", "new\nline", "nul\x00"):
        with pytest.raises(MalformedJobDocError):
            check_stored_value("Manufacturer", bad)
    with pytest.raises(MalformedJobDocError, match="SerialNumber is 32 bytes, more than the 31"):
        check_stored_value("SerialNumber", "s" * 32)


def test_the_longest_stored_values_fit_in_one_document() -> None:
    """Every field an HTTP(S) job can hold, at its longest: the document still fits."""
    longest = {key: "x" * size for key, size in MAX_VALUE_BYTES.items()}
    doc = update_available(
        version="9" * 6 + ".9999.999",  # 15 bytes
        board=longest["Board"],
        connection="HTTPS",
        file="/" + longest["File"][1:],
        server=longest["Server"],
        port="65535",
        manufacturer=longest["Manufacturer"],
        manufacturer_id=longest["ManufacturerId"],
        product=longest["Product"],
        serial_number=longest["SerialNumber"],
    )
    assert len(doc.version) == MAX_VALUE_BYTES["Version"]
    assert len(to_json(doc)) <= MAX_DOCUMENT_BYTES


# --- check_job -----------------------------------------------------------------------------


def job(version: str = "1.76.0", board: str = BOARD) -> JobDocument:
    return update_available(version=version, board=board, connection="HTTP", file="/a.bin")


def test_check_job_accepts_newer() -> None:
    check_job(job("1.76.0"), board=BOARD, current_version="1.75.0")
    check_job(job("1.10.0"), board=BOARD, current_version="1.9.0")
    check_job(job("2.0.0"), board=BOARD, current_version=FirmwareVersion(1, 99, 99, 99))
    check_job(job("1.0.1"), board=BOARD, current_version="1")


@pytest.mark.parametrize(
    "board", ["cy8cproto_062_4343w", "APP_CY8CPROTO_062_4343W", "", BOARD + " "]
)
def test_check_job_board_is_exact(board: str) -> None:
    with pytest.raises(WrongBoardError) as info:
        check_job(job(), board=board, current_version="1.0.0")
    assert BOARD in str(info.value)


@pytest.mark.parametrize("current", ["1.76.0", "1.76.0+3", "1.76.1", "2"])
def test_check_job_version_must_be_strictly_newer(current: str) -> None:
    with pytest.raises(InvalidVersionError) as info:
        check_job(job("1.76.0"), board=BOARD, current_version=current)
    message = str(info.value)
    assert "1.76.0" in message
    assert str(FirmwareVersion.parse(current)) in message


def test_check_job_malformed_inputs() -> None:
    with pytest.raises(MalformedJobDocError):
        check_job(
            JobDocument(message=UPDATE_AVAILABLE, board=BOARD), board=BOARD, current_version="1"
        )
    with pytest.raises(VersionFormatError):
        check_job(job(), board=BOARD, current_version="one")


def test_error_names_match_the_agent() -> None:
    for cls, name in [
        (NotAJobDocError, "NOT_A_JOB_DOC"),
        (MalformedJobDocError, "MALFORMED_JOB_DOC"),
        (WrongBoardError, "WRONG_BOARD"),
        (InvalidVersionError, "INVALID_VERSION"),
    ]:
        assert cls.agent_error == name


# --- properties ----------------------------------------------------------------------------

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["1.2.3", "1.76", "MQTT", "http", "80", "0", UPDATE_AVAILABLE])
)
json_values = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
KEY_SPELLINGS = [*FIELD_LIMITS, "ManufacturerID", "message", "BOARD", "Offset", "Size"]
plausible = st.sampled_from(
    ["", "1.2.3", "1.76", "MQTT", "http", "HTTPS", "80", "0", "/a.bin", BOARD, UPDATE_AVAILABLE]
) | st.text(max_size=30)
# Mostly plausible strings, so that a fair share of documents get past the first checks.
document_like = st.builds(
    lambda head, rest: {**head, **rest},
    st.fixed_dictionaries(
        {}, optional={"Message": st.sampled_from([UPDATE_AVAILABLE, NO_UPDATE_AVAILABLE, "x"])}
    ),
    st.dictionaries(
        st.sampled_from(KEY_SPELLINGS) | st.text(max_size=10),
        st.one_of(plausible, plausible, plausible, json_values, st.text(max_size=300)),
        max_size=12,
    ),
)


def parse_or_error(data: bytes | str) -> JobDocument | OtakitError:
    try:
        return parse_job_document(data)
    except OtakitError as exc:  # anything else fails the test
        return exc


def only_otakit_errors(data: bytes | str) -> None:
    result = parse_or_error(data)
    event(type(result).__name__)
    if isinstance(result, OtakitError):
        assert isinstance(result, NotAJobDocError | MalformedJobDocError)
        assert "\n" not in str(result)
    else:  # whatever parses writes back and parses to the same document
        assert parse_job_document(to_json(result)) == result


@settings(max_examples=300)
@given(json_values)
def test_random_json_values_raise_only_otakit_errors(value: object) -> None:
    only_otakit_errors(json.dumps(value))


@settings(max_examples=300)
@given(document_like)
def test_random_json_objects_raise_only_otakit_errors(value: dict[str, object]) -> None:
    only_otakit_errors(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    only_otakit_errors(json.dumps(value))


@settings(max_examples=300)
@given(st.binary(max_size=1100))
def test_random_bytes_raise_only_otakit_errors(data: bytes) -> None:
    only_otakit_errors(data)


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_random_text_raises_only_otakit_errors(data: str) -> None:
    only_otakit_errors(data)


safe_chars = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")


def field(limit: int, *, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(safe_chars, min_size=min_size, max_size=limit).filter(
        lambda s: len(s.encode()) <= limit
    )


def fold(key: str) -> str:
    return key.lower() if key.isascii() else key


known_folded = {fold(k) for k in FIELD_LIMITS}


@st.composite
def valid_documents(draw: st.DrawFn) -> JobDocument:
    message = draw(
        st.sampled_from([UPDATE_AVAILABLE, NO_UPDATE_AVAILABLE, RESULT_RECEIVED])
        | field(31, min_size=1)
    )
    updating = message == UPDATE_AVAILABLE
    small = st.integers(0, 9999)
    version = draw(
        st.builds("{}.{}.{}".format, small, small, small)
        if updating
        else st.just("") | st.builds("{}.{}.{}".format, small, small, small)
    )
    connection = draw(
        st.sampled_from(CONNECTIONS) if updating else st.sampled_from(["", *CONNECTIONS])
    )
    needs_file = updating and connection in ("HTTP", "HTTPS")
    extra = draw(
        st.lists(
            st.tuples(field(20), field(40)).filter(lambda kv: fold(kv[0]) not in known_folded),
            max_size=3,
            unique_by=lambda kv: fold(kv[0]),
        )
    )
    return JobDocument(
        message=message,
        manufacturer=draw(field(63)),
        manufacturer_id=draw(field(15)),
        product=draw(field(63)),
        serial_number=draw(field(31)),
        version=version,
        board=draw(field(47, min_size=1 if updating else 0)),
        connection=connection,
        server=draw(field(255)),
        port=draw(st.just("") | st.integers(1, 65535).map(str)),
        file=draw(field(255, min_size=1 if needs_file else 0)),
        broker=draw(field(255)),
        unique_topic_name=draw(field(255)),
        extra=tuple(extra),
    )


def to_json_or_none(doc: JobDocument) -> bytes | None:
    """to_json, or None when the document breaks only the whole-document size limit."""
    try:
        return to_json(doc)
    except MalformedJobDocError as exc:
        if f"more than the {MAX_DOCUMENT_BYTES}" in str(exc):
            return None
        raise


@settings(max_examples=300)
@given(valid_documents())
def test_valid_documents_round_trip(doc: JobDocument) -> None:
    data = to_json_or_none(doc)
    assume(data is not None)
    assert data is not None
    assert len(data) <= MAX_DOCUMENT_BYTES
    assert parse_job_document(data) == doc
    assert parse_job_document(data.decode()) == doc
    assert to_json(parse_job_document(data)) == data
