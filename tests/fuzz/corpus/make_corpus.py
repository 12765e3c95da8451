"""Write the first corpus entries: `python tests/fuzz/corpus/make_corpus.py`."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import jwt
from livekit.protocol import agent

HERE = Path(__file__).parent
SECRET = "secret" * 6
FAR = 4_000_000_000  # an exp far in the future (2096)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def frames() -> dict[str, bytes]:
    register = agent.WorkerMessage(
        register=agent.RegisterWorkerRequest(agent_name="a", type=agent.JobType.JT_ROOM)
    ).SerializeToString()
    return {
        "ok-register.bin": register,
        "ok-availability.bin": agent.WorkerMessage(
            availability=agent.AvailabilityResponse(job_id="AJ_x", available=True)
        ).SerializeToString(),
        "empty.bin": b"",
        "no-message-set.bin": b"\x00",
        "truncated-register.bin": register[:-1],
        "length-past-the-end.bin": b"\x0a\xff\xff\xff\xff\x0f",
        "bad-wire-type.bin": b"\x0f",
        "invalid-utf8-agent-name.bin": b"\x0a\x03\x1a\x01\xff",
    }


def tokens() -> dict[str, str]:
    def unsigned(header: object, payload: object) -> str:
        return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}."

    good = {"iss": "devkey", "exp": FAR, "video": {"agent": True}}
    return {
        "ok-agent-grant.txt": jwt.encode(good, SECRET, algorithm="HS256"),
        "alg-none.txt": unsigned({"alg": "none"}, good),
        "wrong-secret.txt": jwt.encode(good, "other" * 7, algorithm="HS256"),
        "no-exp.txt": jwt.encode({"iss": "devkey"}, SECRET, algorithm="HS256"),
        "exp-not-a-number.txt": jwt.encode({"iss": "devkey", "exp": "x"}, SECRET, "HS256"),
        "video-not-an-object.txt": jwt.encode({**good, "video": [1]}, SECRET, "HS256"),
        "payload-a-list.txt": unsigned({"alg": "HS256"}, [1, 2]),
        "crit-header.txt": jwt.encode(good, SECRET, "HS256", headers={"crit": ["x"]}),
        "unknown-key.txt": jwt.encode({**good, "iss": "nokey"}, SECRET, "HS256"),
        "not-base64.txt": "a.b.c",
        "two-parts.txt": "eyJhbGciOiJIUzI1NiJ9.e30",
    }


def tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as t:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            t.addfile(info, io.BytesIO(content) if content is not None else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def bundles() -> dict[str, bytes]:
    ok = (member("agent.py"), b"print('hi')\n")
    huge = member("big.bin")
    huge.size = 2**40  # the header claims a terabyte; the stream ends long before
    bomb_header = io.BytesIO()
    with tarfile.open(fileobj=bomb_header, mode="w:gz", format=tarfile.GNU_FORMAT) as t:
        t.addfile(member("n" * 2000), io.BytesIO(b""))  # a GNU long-name header
    return {
        "ok-one-file.tar.gz": tar([ok]),
        "dotdot.tar.gz": tar([ok, (member("../escape.py"), b"x")]),
        "dotdot-inside.tar.gz": tar([ok, (member("pkg/../../escape.py"), b"x")]),
        "absolute.tar.gz": tar([(member("/tmp/escape.py"), b"x")]),
        "symlink-out.tar.gz": tar([ok, (member("out", tarfile.SYMTYPE, "../../x"), None)]),
        "hardlink.tar.gz": tar([ok, (member("h", tarfile.LNKTYPE, "agent.py"), None)]),
        "fifo.tar.gz": tar([ok, (member("f", tarfile.FIFOTYPE), None)]),
        "device.tar.gz": tar([ok, (member("d", tarfile.CHRTYPE), None)]),
        "file-under-a-file.tar.gz": tar([ok, (member("agent.py/x"), b"y")]),
        "only-a-folder.tar.gz": tar([(member("pkg", tarfile.DIRTYPE), None)]),
        "huge-size-short-stream.tar.gz": tar([ok])[:-40] + b"\0" * 8,
        "not-gzip.tar.gz": b"PK\x03\x04 this is a zip, not a tar.gz",
        "empty.tar.gz": b"",
    } | {"gnu-long-name.tar.gz": bomb_header.getvalue()}


def main() -> None:
    for kind, entries in (("frames", frames()), ("bundles", bundles())):
        (HERE / kind).mkdir(exist_ok=True)
        for name, data in entries.items():
            (HERE / kind / name).write_bytes(data)
    (HERE / "tokens").mkdir(exist_ok=True)
    for name, token in tokens().items():
        (HERE / "tokens" / name).write_text(token + "\n")


if __name__ == "__main__":
    main()
