"""The wire codec (sandbox/wire.py): sans-IO frames, checked as a hostile peer would send them."""

from __future__ import annotations

import io

import pytest

from sandbox.wire import (
    PREFIX,
    Frame,
    FrameDecoder,
    FrameTooLargeError,
    ProtocolError,
    encode_frame,
    read_frame,
)


def frame_bytes(head: bytes, body: bytes = b"") -> bytes:
    """A frame with a raw head, bypassing `encode_frame` so the head can be anything."""
    return PREFIX.pack(len(head), len(body)) + head + body


def decode_all(data: bytes, decoder: FrameDecoder | None = None) -> list[Frame]:
    decoder = decoder or FrameDecoder()
    decoder.feed(data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(Frame({"op": "loaded"}), id="empty_body"),
        pytest.param(Frame({"op": "http", "id": 7}, bytes(range(256)) * 4), id="binary_body"),
        pytest.param(
            Frame({"op": "response", "log": "héllo → 世界 🎉", "headers": [["x-ü", "ß"]]}, b"ok"),
            id="unicode_head",
        ),
        pytest.param(Frame({"op": "http", "nested": {"a": [1, 2.5, None, True]}}), id="nested"),
        pytest.param(Frame({}), id="empty_head"),
    ],
)
def test_frame_round_trips(frame: Frame) -> None:
    assert decode_all(encode_frame(frame)) == [frame]


def test_unicode_head_length_counts_bytes_not_characters() -> None:
    data = encode_frame(Frame({"log": "世界"}, b"xyz"))
    head_len, body_len = PREFIX.unpack_from(data)
    assert head_len == len('{"log":"世界"}'.encode())
    assert body_len == 3
    assert len(data) == PREFIX.size + head_len + body_len


def test_decoder_fed_one_byte_at_a_time_yields_the_frame_only_at_the_last_byte() -> None:
    frame = Frame({"op": "http", "id": 1, "url": "/ü"}, b"\x00\x01body")
    data = encode_frame(frame)
    decoder = FrameDecoder()
    for byte in data[:-1]:
        decoder.feed(bytes([byte]))
        assert decoder.next_frame() is None
    decoder.feed(data[-1:])
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.pending_bytes == 0


def test_several_frames_in_one_feed_come_out_in_order() -> None:
    frames = [Frame({"op": "http", "id": i}, b"x" * i) for i in range(5)]
    assert decode_all(b"".join(encode_frame(f) for f in frames)) == frames


def test_partial_frame_after_whole_ones_waits_for_more_bytes() -> None:
    first, second = Frame({"id": 1}, b"a"), Frame({"id": 2}, b"bb")
    data = encode_frame(first) + encode_frame(second)
    decoder = FrameDecoder()
    assert decode_all(data[:-1], decoder) == [first]
    assert decoder.pending_bytes == len(encode_frame(second)) - 1
    assert decode_all(data[-1:], decoder) == [second]


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"not json", id="not_json"),
        pytest.param(b"", id="empty_head"),
        pytest.param(b'{"op": "x"', id="truncated_json"),
        pytest.param(b'["op", "x"]', id="json_array"),
        pytest.param(b'"op"', id="json_string"),
        pytest.param(b"42", id="json_number"),
        pytest.param(b"null", id="json_null"),
        pytest.param(b'{"op": "\xff"}', id="invalid_utf8_in_string"),
        pytest.param(b'{"op": "\xc3"}', id="truncated_utf8_sequence"),
        # json.loads(bytes) sniffs UTF-16/32; the wire says the head is UTF-8, and these bytes
        # are not valid UTF-8.
        pytest.param('{"op": "x"}'.encode("utf-16"), id="utf16_head"),
        pytest.param('{"op": "x"}'.encode("utf-32-le"), id="utf32_head"),
    ],
)
def test_malformed_head_is_a_protocol_error(head: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(frame_bytes(head, b"body"))
    with pytest.raises(ProtocolError):
        decoder.next_frame()


def test_deeply_nested_head_is_a_protocol_error_not_a_recursion_error() -> None:
    # Valid JSON, well under the head limit, but it blows the C decoder's recursion guard: a
    # hostile worker must not be able to raise anything but ProtocolError in the front end.
    decoder = FrameDecoder()
    decoder.feed(frame_bytes(b"[" * 200_000 + b"]" * 200_000))
    with pytest.raises(ProtocolError):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("head_len", "body_len", "part"),
    [
        pytest.param(101, 0, "head", id="head_over_limit"),
        pytest.param(10, 1001, "body", id="body_over_limit"),
        pytest.param(2**32 - 1, 0, "head", id="head_of_4_gib"),
        pytest.param(10, 2**32 - 1, "body", id="body_of_4_gib"),
    ],
)
def test_oversized_frame_is_refused_from_the_prefix_alone(
    head_len: int, body_len: int, part: str
) -> None:
    decoder = FrameDecoder(max_head_bytes=100, max_body_bytes=1000)
    decoder.feed(PREFIX.pack(head_len, body_len))  # only the 8-byte prefix, no payload
    with pytest.raises(FrameTooLargeError) as info:
        decoder.next_frame()
    assert info.value.part == part
    assert info.value.size == (head_len if part == "head" else body_len)
    assert isinstance(info.value, ProtocolError)


def test_frame_exactly_at_the_limits_is_accepted() -> None:
    head = b'{"k":"' + b"x" * 92 + b'"}'
    assert len(head) == 100
    decoder = FrameDecoder(max_head_bytes=100, max_body_bytes=1000)
    decoder.feed(PREFIX.pack(100, 1000))
    assert decoder.next_frame() is None  # waits for the payload instead of refusing
    decoder.feed(head + b"b" * 1000)
    frame = decoder.next_frame()
    assert frame is not None
    assert frame.body == b"b" * 1000


def test_default_limits_allow_a_five_mib_response_body() -> None:
    body = b"r" * (5 * 1024 * 1024)
    assert decode_all(encode_frame(Frame({"op": "response"}, body))) == [
        Frame({"op": "response"}, body)
    ]


def test_frame_op_reads_the_head() -> None:
    assert Frame({"op": "load"}).op == "load"
    assert Frame({}).op is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(b"", [], id="empty_stream"),
        pytest.param(encode_frame(Frame({"op": "a"})), [Frame({"op": "a"})], id="one_frame"),
        pytest.param(
            encode_frame(Frame({"op": "a"}, b"1")) + encode_frame(Frame({"op": "b"}, b"22")),
            [Frame({"op": "a"}, b"1"), Frame({"op": "b"}, b"22")],
            id="two_frames",
        ),
    ],
)
def test_read_frame_returns_none_at_a_clean_end_between_frames(
    data: bytes, expected: list[Frame]
) -> None:
    stream, decoder = io.BytesIO(data), FrameDecoder()
    frames = []
    while (frame := read_frame(stream, decoder)) is not None:
        frames.append(frame)
    assert frames == expected
    assert read_frame(stream, decoder) is None


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(3, id="inside_prefix"),
        pytest.param(PREFIX.size, id="after_prefix"),
        pytest.param(PREFIX.size + 4, id="inside_head"),
        pytest.param(-1, id="inside_body"),
    ],
)
def test_read_frame_raises_when_the_stream_ends_mid_frame(cut: int) -> None:
    data = encode_frame(Frame({"op": "http", "id": 1}, b"body"))
    stream, decoder = io.BytesIO(encode_frame(Frame({"op": "load"})) + data[:cut]), FrameDecoder()
    assert read_frame(stream, decoder) == Frame({"op": "load"})
    with pytest.raises(ProtocolError):
        read_frame(stream, decoder)


def test_read_frame_serves_a_large_body_across_many_reads() -> None:
    frame = Frame({"op": "http"}, bytes(range(256)) * 2000)  # 512 KB, several 64 KiB reads
    assert read_frame(io.BytesIO(encode_frame(frame)), FrameDecoder()) == frame
