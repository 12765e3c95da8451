"""What workers, callers and uploads send, fuzzed: worker protocol frames, access tokens and
source bundles. Whatever the bytes, the answer is the module's own clear error (ProtocolError,
AuthError, BundleRejected), never another exception, and a bundle refused writes nothing.

The corpus in tests/fuzz/corpus is replayed first, every run: inputs that once broke something,
or that sit on an edge, stay tested whatever the generator draws.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from livekit.protocol import agent

from voicefleet.build.bundle import extract_bundle
from voicefleet.errors import AuthError, BundleRejected, ProtocolError
from voicefleet.protocol import tokens
from voicefleet.protocol.frames import parse_worker_message

CORPUS = Path(__file__).parent / "corpus"
KEY, SECRET = "devkey", "secret" * 6


def corpus(kind: str) -> list[Path]:
    return sorted((CORPUS / kind).iterdir())


# -- worker frames ----------------------------------------------------------------------------


def valid_frames() -> list[bytes]:
    return [
        agent.WorkerMessage(
            register=agent.RegisterWorkerRequest(agent_name="a", type=agent.JobType.JT_ROOM)
        ).SerializeToString(),
        agent.WorkerMessage(
            availability=agent.AvailabilityResponse(job_id="AJ_x", available=True)
        ).SerializeToString(),
        agent.WorkerMessage(
            update_job=agent.UpdateJobStatus(job_id="AJ_x", status=agent.JobStatus.JS_RUNNING)
        ).SerializeToString(),
        agent.WorkerMessage(
            update_worker=agent.UpdateWorkerStatus(load=0.5, job_count=2)
        ).SerializeToString(),
    ]


def check_frame(data: bytes) -> None:
    try:
        msg = parse_worker_message(data)
    except ProtocolError as e:
        assert str(e)
    else:
        assert msg.WhichOneof("message") is not None


@pytest.mark.parametrize("path", corpus("frames"), ids=lambda p: p.name)
def test_frame_corpus(path: Path) -> None:
    data = path.read_bytes()
    if path.name.startswith("ok-"):
        assert parse_worker_message(data).WhichOneof("message")
    else:
        with pytest.raises(ProtocolError):
            parse_worker_message(data)


@given(st.binary(max_size=512))
@example(b"")
@example(b"\x0a\xff\xff\xff\xff\x0f")  # a length far past the frame's end
def test_arbitrary_bytes_decode_or_raise_protocol_error(data: bytes) -> None:
    check_frame(data)


@given(st.sampled_from(valid_frames()), st.data())
def test_mutated_frames_decode_or_raise_protocol_error(frame: bytes, data: st.DataObject) -> None:
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            buf += buf[i:]
    check_frame(bytes(buf))


# -- access tokens ----------------------------------------------------------------------------


def secret_for(key: str) -> str | None:
    return SECRET if key == KEY else None


def check_token(token: str) -> None:
    try:
        claims = tokens.verify(token, secret_for)
    except AuthError as e:
        assert str(e)
        return
    assert claims.api_key == KEY
    try:
        claims.require("agent")
        claims.require_admin()
    except AuthError as e:
        assert str(e)


def check_worker_token(token: str) -> None:
    try:
        tokens.verify_worker_token(token, SECRET)
    except AuthError as e:
        assert str(e)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("path", corpus("tokens"), ids=lambda p: p.name)
def test_token_corpus(path: Path) -> None:
    token = path.read_text().strip()
    if path.name.startswith("ok-"):
        tokens.verify(token, secret_for)
    else:
        with pytest.raises(AuthError):
            tokens.verify(token, secret_for)
            tokens.verify_worker_token(token, SECRET)


def signed(payload: object) -> str:
    """An HS256 token signed with the project's secret, whatever its payload (jwt.encode would
    refuse some: the verifier must not rely on tokens having been minted by it)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    mac = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


@given(st.text(max_size=300))
@example("a.b.c")
@example("..")
def test_arbitrary_text_is_refused_with_auth_error(token: str) -> None:
    check_token(token)
    check_worker_token(token)


@given(
    header=st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "x"]), JSON),
    payload=JSON,
    signature=st.binary(max_size=40),
)
@example(header={"alg": "none"}, payload={"iss": KEY, "exp": 2**40}, signature=b"")
@example(header={"alg": "HS256", "crit": ["x"]}, payload={"iss": KEY}, signature=b"")
@example(header={"alg": "HS256"}, payload=[1, 2], signature=b"")
def test_forged_tokens_are_refused_with_auth_error(
    header: dict[str, object], payload: object, signature: bytes
) -> None:
    token = ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)]
    )
    check_token(token)
    check_worker_token(token)


@given(
    claims=st.dictionaries(
        st.sampled_from(["iss", "exp", "nbf", "sub", "video", "agent", "version", "instance"]),
        JSON,
    ),
    data=st.data(),
)
@example(claims={"iss": KEY, "exp": 2**40, "video": [1]}, data=None)
@example(claims={"iss": KEY, "exp": "soon"}, data=None)
@example(claims={"iss": KEY, "exp": 2**40, "nbf": 2**40}, data=None)
@example(claims={"iss": KEY, "exp": 2**40, "video": {"agent": "true"}}, data=None)
@example(claims={"iss": KEY, "exp": 1e300}, data=None)
def test_signed_tokens_with_any_claims_verify_or_raise_auth_error(
    claims: dict[str, object], data: st.DataObject | None
) -> None:
    """Signed with the right secret but holding anything: the claims are checked, not trusted."""
    token = signed(claims)
    if data is not None and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(token) - 1))
        token = token[:i] + data.draw(st.sampled_from("A_-.=x")) + token[i + 1 :]
    check_token(token)
    check_worker_token(token)


# -- source bundles ---------------------------------------------------------------------------

Member = tuple[str, bytes, str, str]  # name, content, kind, link target

NAMES = st.sampled_from(
    [
        "agent.py",
        "pkg/mod.py",
        "../escape.py",
        "pkg/../../escape.py",
        "/etc/escape",
        "\\windows",
        "./ok.txt",
        "a" * 300,
        "pkg",
        "",
        "x\0y",
        "deep/" * 60 + "f",
    ]
)
KINDS = st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "fifo", "chr"])
LINKS = st.sampled_from(["../../outside", "/etc/passwd", "agent.py", "pkg"])


def tar_of(members: list[Member]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, content, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type = {
                "file": tarfile.REGTYPE,
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
                "chr": tarfile.CHRTYPE,
            }[kind]
            info.linkname = link
            if kind == "file":
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                tar.addfile(info)
    return out.getvalue()


def check_bundle(data: bytes, root: Path, **limits: int) -> None:
    """Extracted into root/dest, or refused with BundleRejected; nothing else in `root`."""
    root.mkdir()
    dest = root / "dest"
    try:
        info = extract_bundle(io.BytesIO(data), dest, **limits)
    except BundleRejected as e:
        assert str(e)
        assert not dest.exists()
        assert list(root.iterdir()) == [], "a refused bundle left files behind"
        return
    assert info.files >= 1
    assert [p.name for p in root.iterdir()] == ["dest"]
    for path in dest.rglob("*"):
        assert not path.is_symlink()
        assert path.resolve().is_relative_to(dest.resolve())
        assert path.is_file() or path.is_dir()


@pytest.mark.parametrize("path", corpus("bundles"), ids=lambda p: p.name)
def test_bundle_corpus(path: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    if path.name.startswith("ok-"):
        root.mkdir()
        extract_bundle(path, root / "dest")
    else:
        with pytest.raises(BundleRejected):
            root.mkdir()
            extract_bundle(path, root / "dest")
        assert list(root.iterdir()) == []


@given(st.lists(st.tuples(NAMES, st.binary(max_size=64), KINDS, LINKS), min_size=0, max_size=6))
@example([("pkg/../../escape.py", b"x", "file", "")])
@example([("agent.py", b"x", "file", ""), ("link", b"", "symlink", "../../outside")])
@example([("agent.py", b"x", "file", ""), ("agent.py/inner", b"y", "file", "")])
def test_hostile_bundles_are_refused_and_write_nothing_outside(members: list[Member]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        check_bundle(tar_of(members), Path(tmp) / "root", max_bytes=256, max_files=5)


@given(st.binary(min_size=1, max_size=256), st.data())
def test_mutated_bundles_are_refused_or_extracted_safely(junk: bytes, data: st.DataObject) -> None:
    base = tar_of([("agent.py", b"print('hi')\n" * 4, "file", ""), ("pkg", b"", "dir", "")])
    buf = bytearray(base)
    i = data.draw(st.integers(0, len(buf) - 1))
    op = data.draw(st.sampled_from(["splice", "cut", "flip"]))
    if op == "splice":
        buf[i : i + len(junk)] = junk
    elif op == "cut":
        del buf[i:]
    else:
        buf[i] ^= junk[0] or 1
    with tempfile.TemporaryDirectory() as tmp:
        check_bundle(bytes(buf), Path(tmp) / "root")
