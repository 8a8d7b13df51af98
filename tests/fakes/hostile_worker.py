"""A fake worker that speaks the wire protocol, then breaks it on request.

The request path picks the misbehaviour; `/ok` answers properly, so a test can show the pool
recovering with a fresh worker of the same kind.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time

from sandbox.wire import Frame, FrameDecoder, encode_frame, read_frame


def reply(out: int, frame: Frame) -> None:
    os.write(out, encode_frame(frame))


def main() -> int:
    inp, out = os.fdopen(0, "rb", buffering=0), 1
    decoder = FrameDecoder()
    load = read_frame(inp, decoder)
    if load is None:
        return 0
    if load.head.get("mode") == "check":  # checks at save: the val's name picks the behaviour
        name = load.head.get("name")
        if name == "crash":
            return 3
        problems: object = [] if name == "ok" else "not a list"
        reply(out, Frame({"op": "checked", "problems": problems}))
        return 0
    source = load.body.decode()
    if source.startswith("load-ask:"):  # an ask while the module loads: the source says which
        kind = source.partition(":")[2]
        ask: dict[str, object] = {"op": "import", "id": 0, "user": "bob", "val": "util"}
        if kind == "fetch":
            ask = {"op": "fetch", "id": 0, "method": "GET", "url": "http://10.0.0.1/"}
            ask |= {"headers": [], "timeout_s": None, "follow_redirects": True}
        elif kind == "wrong-id":
            ask["id"] = 7
        elif kind == "malformed":
            ask["version"] = "latest"
        reply(out, Frame(ask))
        answer = read_frame(inp, decoder)
        if answer is None:
            return 0
        reply(out, Frame({"op": "loaded", "log": json.dumps(answer.head, sort_keys=True)}))
    else:
        reply(out, Frame({"op": "loaded", "log": ""}))
    while (frame := read_frame(inp, decoder)) is not None:
        rid, path = int(str(frame.head["id"])), frame.head["path"]
        ok = Frame({"op": "response", "id": rid, "status": 200, "headers": [], "log": ""}, b"ok")
        query = str(frame.head.get("query", ""))
        if "slow" in query:  # long enough for a test to send requests behind this one
            time.sleep(0.5)
        if path == "/ok":
            reply(out, ok)
        elif path == "/echo":  # which request this reply answers
            reply(out, Frame(ok.head, query.encode()))
        elif path == "/garbage":
            os.write(out, b"\x00\x00\x00\x05\x00\x00\x00\x00{not json at all")
        elif path == "/not-an-object":
            os.write(out, struct.pack(">II", 2, 0) + b"[]")
        elif path == "/huge-head":
            os.write(out, struct.pack(">II", 2**31, 0))
        elif path == "/huge-body":
            os.write(out, struct.pack(">II", 2, 2**31) + b"{}")
        elif path == "/wrong-id":
            reply(out, Frame({**ok.head, "id": rid + 1000}, b"ok"))
        elif path == "/string-id":
            reply(out, Frame({**ok.head, "id": str(rid)}, b"ok"))
        elif path == "/bad-status":
            reply(out, Frame({**ok.head, "status": 99}, b"ok"))
        elif path == "/unknown-op":
            reply(out, Frame({**ok.head, "op": "surprise"}))
        elif path == "/fake-error-type":
            reply(
                out, Frame({"op": "error", "id": rid, "type": "all_good", "message": "", "log": ""})
            )
        elif path == "/half-then-hang":
            data = encode_frame(ok)
            os.write(out, data[: len(data) // 2])
            time.sleep(3600)
        elif path == "/exit-mid-reply":
            data = encode_frame(ok)
            os.write(out, data[:10])
            return 3
        elif str(path).startswith("/ask"):
            # A fetch ask (`/ask`), one for another invocation (`/ask-wrong-id`), or one that
            # is not a valid fetch message (`/ask-malformed`); the answer becomes the body.
            ask = {"op": "fetch", "id": rid, "method": "GET", "url": "http://10.0.0.1/"}
            ask |= {"headers": [], "timeout_s": None, "follow_redirects": True}
            if path == "/ask-wrong-id":
                ask["id"] = rid + 1000
            elif path == "/ask-malformed":
                ask["headers"] = "not a list"
            elif path == "/ask-unknown-kind":
                ask = {"op": "launch-missiles", "id": rid}
            reply(out, Frame(ask))
            answer = read_frame(inp, decoder)
            if answer is None:
                return 0
            reply(out, Frame(ok.head, json.dumps(answer.head).encode()))
        elif path == "/bad-storage-ask":
            reply(out, Frame({"op": "blob", "id": rid, "action": "drop", "key": "k", "limit": 0}))
        elif path == "/ask-for-another-request":
            reply(out, Frame({"op": "sql", "id": rid + 1}, b'[["SELECT 1", []]]'))
        elif path == "/silent-exit":
            return 0
        elif path == "/flood":
            chunk = json.dumps({"op": "response"}).encode() * 1000
            while True:
                os.write(out, chunk)
        else:
            reply(out, Frame({**ok.head, "status": 500}, b"unknown fake path"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
