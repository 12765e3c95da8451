"""`vf server backup` / `vf server restore`: a real server backed up while it serves and writes,
restored into a new data dir on which a new server knows everything and can roll back; the
secrets key kept apart; hostile archives refused with nothing written outside the data dir."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from livekit import api

from tests.support import DEV_KEY, DEV_SECRET, Server, release, started, wait_for
from tests.test_deploy import AGENT_SRC, SECRET, api_get, dispatch, job_state, vf, vf_env
from tests.test_store import _pg_bindir, postgres  # noqa: F401 (a fixture)
from voicefleet.control.backup import backup
from voicefleet.control.restore import OPEN_AT_BACKUP, restore
from voicefleet.errors import BackupRejected, VoicefleetError
from voicefleet.store.db import open_engine
from voicefleet.store.models import AgentRow, VersionRow
from voicefleet.store.repo import Repo


def vf_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voicefleet", "server", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def members(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "my-agent"
    shutil.copytree(AGENT_SRC, folder)
    (folder / "VERSION").write_text("one")
    return folder


@pytest.mark.timeout(900)
async def test_a_backup_taken_while_serving_restores_agents_versions_secrets_flags_and_rollback(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server("--keep-warm", "1")
    markers = tmp_path / "markers"
    markers.mkdir()
    vf(server, agent_dir, "create")
    vf(server, agent_dir, "secrets", "set", f"MARKER_DIR={markers}", f"VF_TEST_SECRET={SECRET}")
    assert "v1" in vf(server, agent_dir, "deploy").stdout
    (agent_dir / "VERSION").write_text("two")
    assert "v2" in vf(server, agent_dir, "deploy").stdout
    flag = subprocess.run(
        [sys.executable, "-m", "voicefleet", "flags", "set", "my-agent", "greeting", "restored"],
        env=vf_env(server),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert flag.returncode == 0, flag.stderr

    lk = api.LiveKitAPI(server.url, DEV_KEY, DEV_SECRET)
    archive = tmp_path / "backups" / "vf.tar.gz"
    archive.parent.mkdir()
    try:
        held = await dispatch(lk, "held-over-the-backup", until_released=True)
        await wait_for(lambda: started(markers, held), 90, "the held call to start")
        # The server writes while the backup reads: sessions dispatched back to back.
        dispatched: list[str] = []
        stop = asyncio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                dispatched.append(await dispatch(lk, f"busy-{len(dispatched)}"))

        writer = asyncio.create_task(traffic())
        await wait_for(lambda: len(dispatched) >= 5, 60, "traffic before the backup")
        taken = await asyncio.to_thread(
            vf_server, "backup", str(archive), "--data-dir", str(server.data_dir)
        )
        during = len(dispatched)
        await wait_for(lambda: len(dispatched) >= during + 5, 60, "traffic after the backup")
        stop.set()
        await writer
        assert taken.returncode == 0, taken.stderr
        assert "1 agent(s), 2 version(s), 2 secret(s) (encrypted), 1 flag(s)" in taken.stdout
        assert "NOT IN THIS BACKUP" in taken.stderr and "secrets.key" in taken.stderr
        names = members(archive)
        assert names[0] == "manifest.json" and "voicefleet.db" in names
        assert sum(n.endswith("/bundle.tar.gz") for n in names) == 2
        assert not any(n.endswith(("secrets.key", "credentials.json")) for n in names)
        assert archive.stat().st_mode & 0o077 == 0  # it holds the store: the owner's only
        release(markers, held)
        old_pids = {i["pid"] for i in api_get(server, "/agents/my-agent")["instances"]}
    finally:
        await lk.aclose()

    restored = tmp_path / "restored"
    done = vf_server("restore", str(archive), "--data-dir", str(restored))
    assert done.returncode == 0, done.stderr
    assert "1 agent(s), 2 version(s), 2 secret(s)" in done.stdout
    assert "SECRETS CANNOT BE DECRYPTED YET" in done.stderr  # the key is not copied yet
    # The key is backed up apart, and copied in apart. A new env cache: as on a new machine,
    # no environment is there and the first start builds them again.
    shutil.copy2(server.data_dir / "secrets.key", restored / "secrets.key")
    envs = tmp_path / "envs-of-the-new-machine"
    # Sources gone too (a data dir put back by hand): unpacked from the bundle at start.
    for src in restored.glob("agents/*/v1/src"):
        shutil.rmtree(src)
    again = Server(restored, "--keep-warm", "1", "--env-cache", str(envs))
    try:
        # Ready once the environments are built (uv installs livekit-agents: a minute or so).
        again.start(timeout=600)
        await _check_restored(again, agent_dir, markers, held, old_pids, envs)
    finally:
        again.stop()


async def _check_restored(
    again: Server, agent_dir: Path, markers: Path, held: str, old_pids: set[int], envs: Path
) -> None:
    """The restored server knows every agent, version, secret and flag, and rolls back."""
    versions = {v["version"]: v for v in api_get(again, "/agents/my-agent/versions")}
    assert {v: versions[v]["status"] for v in versions} == {"v1": "ready", "v2": "ready"}
    assert list(envs.glob("*/.voicefleet-complete")), "no environment built in the new cache"
    for log in again.data_dir.glob("agents/*/v*/build.log"):
        assert "built again" in log.read_text(), log
    assert len(list(again.data_dir.glob("agents/*/v1/src/agent.py"))) == 1
    listed = vf(again, agent_dir, "secrets", "list").stdout
    assert "MARKER_DIR" in listed and "VF_TEST_SECRET" in listed
    assert api_get(again, "/agents/my-agent/flags/greeting")["value"] == "restored"
    held_job = again.job(held)
    assert held_job is not None and held_job["state"] == "failed", held_job
    assert held_job["error"] == OPEN_AT_BACKUP

    lk = api.LiveKitAPI(again.url, DEV_KEY, DEV_SECRET)
    try:
        call = await dispatch(lk, "after-restore")
        await wait_for(job_state(again, call, "succeeded", "failed"), 120, "a call after restore")
        seen = started(markers, call)
        assert seen is not None
        # v2 serves, its secret decrypted with the copied key, the restored flag live.
        assert (seen["version"], seen["secret"], seen["greeting"]) == ("v2", SECRET, "restored")
        instances = api_get(again, "/agents/my-agent")["instances"]
        assert not {i["pid"] for i in instances if i["status"] == "ready"} & old_pids

        rolled = vf(again, agent_dir, "rollback")
        assert "rollback to v1: complete" in rolled.stdout
        back = await dispatch(lk, "back-on-v1")
        await wait_for(job_state(again, back, "succeeded", "failed"), 90, "a call on v1")
        seen = started(markers, back)
        assert seen is not None and (seen["version"], seen["secret"]) == ("v1", SECRET)
    finally:
        await lk.aclose()


async def test_without_its_key_a_restore_says_secrets_cannot_be_decrypted_and_the_server_refuses(
    start_server: Callable[..., Server], agent_dir: Path, tmp_path: Path
) -> None:
    server = start_server()
    vf(server, agent_dir, "create")
    vf(server, agent_dir, "secrets", "set", "API_TOKEN=t0k3n", "OTHER=x")
    archive = tmp_path / "vf.tar.gz"
    assert vf_server("backup", str(archive), "--data-dir", str(server.data_dir)).returncode == 0

    restored = tmp_path / "restored"
    done = vf_server("restore", str(archive), "--data-dir", str(restored))
    assert done.returncode == 0, done.stderr
    assert "SECRETS CANNOT BE DECRYPTED YET" in done.stderr
    assert f"{restored / 'secrets.key'} is missing" in done.stderr
    assert not (restored / "secrets.key").exists()

    def start() -> str:
        with pytest.raises(RuntimeError) as failed:
            Server(restored).start()
        return str(failed.value)

    log = start()  # the server makes no new key: the secrets would never open again
    assert "the store holds 2 encrypted secret(s) and secrets.key is missing" in log
    assert "cannot be decrypted" in log and not (restored / "secrets.key").exists()
    (restored / "secrets.key").write_bytes(Fernet.generate_key())  # another data dir's key
    assert "secrets.key decrypts none of the store's 2 secret(s)" in start()

    again = vf_server("restore", str(archive), "--data-dir", str(restored))
    assert again.returncode == 1 and "is not empty" in again.stderr
    dropped = vf_server(
        "restore", str(archive), "--data-dir", str(restored), "--force", "--drop-secrets"
    )
    assert dropped.returncode == 0, dropped.stderr
    assert "Secrets of my-agent left out (set them again): API_TOKEN, OTHER" in dropped.stdout
    revived = start_server(data_dir=restored)
    assert api_get(revived, "/agents/my-agent/secrets") == []
    assert api_get(revived, "/agents/my-agent")["agent"]["name"] == "my-agent"


# -- hostile archives: refused, nothing written outside the data dir (nor in it) ---------------


def _tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes, size: int | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    return info, data


def _manifest(files: dict[str, Any]) -> tuple[tarfile.TarInfo, bytes]:
    body = {"format": "voicefleet-backup", "format_version": 1, "files": files}
    return _file("manifest.json", json.dumps(body).encode())


@pytest.fixture
def good_archive(tmp_path: Path) -> Path:
    """A real backup of a data dir with a store and one version (no server needed)."""
    data = tmp_path / "source"
    asyncio.run(_store(data))
    version = data / "agents" / "CA_abc" / "v1"
    version.mkdir(parents=True)
    _tar(version / "bundle.tar.gz", [_file("agent.py", b"print('hi')\n")])
    return backup(data, tmp_path / "good.tar.gz").path


async def _store(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    engine = await open_engine(f"sqlite+aiosqlite:///{data_dir / 'voicefleet.db'}")
    await Repo(engine).save(
        AgentRow(id="CA_abc", name="a", grace_period=0.0, created_at=0.0),
        VersionRow(
            agent_id="CA_abc", version="v1", number=1, status="ready", source_digest="d",
            dependency_digest="d", python="", error="", created_at=0.0, built_at=0.0,
        ),
    )  # fmt: skip
    await engine.dispose()


def test_a_good_archive_restores_its_version_sources(good_archive: Path, tmp_path: Path) -> None:
    report = restore(good_archive, tmp_path / "new")
    assert (report.contents.agents, len(report.contents.versions)) == (1, 1)
    src = tmp_path / "new" / "agents" / "CA_abc" / "v1" / "src" / "agent.py"
    assert src.read_text() == "print('hi')\n"
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["agents", "voicefleet.db"]


def _bundle_of(archive: Path) -> tuple[str, bytes]:
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if m.name.endswith("bundle.tar.gz"):
                reader = tar.extractfile(m)
                assert reader is not None
                return m.name, reader.read()
    raise AssertionError("no bundle")


def _db_of(archive: Path) -> bytes:
    with tarfile.open(archive) as tar:
        reader = tar.extractfile("voicefleet.db")
        assert reader is not None
        return reader.read()


def _entry(data: bytes) -> dict[str, Any]:
    import hashlib

    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _link(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


HOSTILE: dict[str, tuple[Callable[[Path], list[tuple[tarfile.TarInfo, bytes | None]]], str]] = {
    "path traversal": (
        lambda a: [_manifest({"voicefleet.db": _entry(b"x")}), _file("../../evil", b"pwned")],
        "leads out of the data dir",
    ),
    "traversal inside a version path": (
        lambda a: [
            _manifest({"voicefleet.db": _entry(b"x")}),
            _file("agents/CA_abc/v1/../../../../evil", b"pwned"),
        ],
        "leads out of the data dir",
    ),
    "absolute path": (
        lambda a: [_manifest({"voicefleet.db": _entry(b"x")}), _file("/tmp/evil", b"pwned")],
        "leads out of the data dir",
    ),
    "symlink": (
        lambda a: [
            _manifest({"voicefleet.db": _entry(b"x")}),
            _link("agents/CA_abc/v1/bundle.tar.gz", "/etc/passwd"),
        ],
        "is a link ('/etc/passwd')",
    ),
    "hard link": (
        lambda a: [
            _manifest({"voicefleet.db": _entry(b"x")}),
            _link("voicefleet.db", "/etc/x", True),
        ],
        "is a link",
    ),
    "huge member": (
        lambda a: [
            _manifest({"voicefleet.db": _entry(b"x")}),
            (_file("agents/CA_abc/v1/bundle.tar.gz", b"", size=3 << 30)[0], None),
        ],
        "is 3221225472 bytes: more than a voicefleet backup's bundle.tar.gz can be",
    ),
    "huge manifest entry": (
        lambda a: [_manifest({"voicefleet.db": {"size": 1 << 50, "sha256": "0"}})],
        "entry of 'voicefleet.db' is invalid or too big",
    ),
    "manifest of the wrong types": (
        lambda a: [
            _file(
                "manifest.json",
                json.dumps(
                    {"format": "voicefleet-backup", "format_version": 1, "created_at": "then"}
                ).encode(),
            )
        ],
        "the archive's manifest is invalid",
    ),
    "not a backup": (
        lambda a: [_file("agent.py", b"print('hi')\n")],
        "not a voicefleet backup: it starts with 'agent.py'",
    ),
    "a stranger file": (
        lambda a: [_manifest({"voicefleet.db": _entry(b"x")}), _file("secrets.key", b"k")],
        "is not part of a voicefleet backup",
    ),
    "damaged store": (
        lambda a: [_manifest({"voicefleet.db": _entry(b"x")}), _file("voicefleet.db", b"y")],
        "damaged: its sha256 is not the manifest's",
    ),
    "not a database": (
        lambda a: [
            _manifest({"voicefleet.db": _entry(b"x" * 4096)}),
            _file("voicefleet.db", b"x" * 4096),
        ],
        "not a voicefleet database",
    ),
    "hostile bundle inside": (
        lambda a: (
            lambda db, bundle: [
                _manifest(
                    {"voicefleet.db": _entry(db), "agents/CA_abc/v1/bundle.tar.gz": _entry(bundle)}
                ),
                _file("voicefleet.db", db),
                _file("agents/CA_abc/v1/bundle.tar.gz", bundle),
            ]
        )(_db_of(a), _evil_bundle(a.parent)),
        "the bundle of CA_abc v1 is refused: bundle member '../../../evil' leaves the folder",
    ),
    "incomplete": (
        lambda a: [_manifest({"voicefleet.db": _entry(_db_of(a))})],
        "incomplete: voicefleet.db missing",
    ),
}


def _evil_bundle(where: Path) -> bytes:
    path = _tar(where / "evil-bundle.tar.gz", [_file("../../../evil", b"pwned")])
    return path.read_bytes()


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_archive_is_refused_and_nothing_is_written(
    case: str, good_archive: Path, tmp_path: Path
) -> None:
    build, reason = HOSTILE[case]
    archive = _tar(tmp_path / "hostile.tar.gz", build(good_archive))
    around = tmp_path / "around"
    around.mkdir()
    target = around / "deep" / "data"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(BackupRejected) as refused:
        restore(archive, target)
    assert reason in str(refused.value)
    assert not target.exists()  # made by the restore, so taken away with what it held
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # The folders above the data dir stay (made as `mkdir -p` would); nothing else is new.
    assert [p for p in after if p not in before] == [Path("around", "deep")]
    assert not list(tmp_path.parent.glob("evil")) and not Path("/tmp/evil").exists()


def test_the_command_line_names_the_archive_and_the_reason(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar at all")
    done = vf_server("restore", str(junk), "--data-dir", str(tmp_path / "new"))
    assert done.returncode == 1
    assert f"{junk} cannot be restored: not a readable tar.gz" in done.stderr
    assert not (tmp_path / "new").exists()


def test_a_backup_needs_a_store_and_says_where_postgresql_is_backed_up(tmp_path: Path) -> None:
    with pytest.raises(VoicefleetError, match="pg_dump"):
        backup(tmp_path, tmp_path / "b.tar.gz")


def test_a_restore_checks_free_space_before_writing_anything(
    good_archive: Path, tmp_path: Path
) -> None:
    from voicefleet.control.restore import _unpack

    stage = tmp_path / "stage"
    stage.mkdir()
    with pytest.raises(BackupRejected, match="MB free"):
        _unpack(good_archive, stage, free=10)
    assert list(stage.iterdir()) == []


# -- PostgreSQL: pg_dump and the data dir's bundles, as docs/operations.md says -----------------


@pytest.mark.timeout(900)
async def test_postgresql_backed_up_with_pg_dump_and_the_bundles_restores_as_documented(
    request: pytest.FixtureRequest,
    start_server: Callable[..., Server],
    agent_dir: Path,
    tmp_path: Path,
) -> None:
    pg_url: str = request.getfixturevalue("postgres")  # tests/test_store.py's server
    bindir = _pg_bindir()
    assert bindir is not None  # the postgres fixture skips without it
    server = start_server("--database-url", pg_url)
    markers = tmp_path / "markers"
    markers.mkdir()
    vf(server, agent_dir, "create")
    vf(server, agent_dir, "secrets", "set", f"MARKER_DIR={markers}", f"VF_TEST_SECRET={SECRET}")
    vf(server, agent_dir, "deploy")
    flag = subprocess.run(
        [sys.executable, "-m", "voicefleet", "flags", "set", "my-agent", "greeting", "pg"],
        env=vf_env(server),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert flag.returncode == 0, flag.stderr

    libpq = pg_url.replace("+asyncpg", "")  # pg_dump's URL: no driver
    dump, files = tmp_path / "vf.dump", tmp_path / "vf-files.tar.gz"
    subprocess.run(
        [str(bindir / "pg_dump"), "--format=custom", f"--file={dump}", libpq], check=True
    )
    subprocess.run(
        ["bash", "-c", f"cd {server.data_dir} && tar -czf {files} "
         "agents/*/v*/bundle.tar.gz agents/*/v*/build.log"],
        check=True,
    )  # fmt: skip
    host, port = libpq.split("@")[1].split("/")[0].split(":")
    subprocess.run(
        [str(bindir / "createdb"), "-h", host, "-p", port, "-U", "vf", "voicefleet_new"],
        check=True,
    )
    new_libpq = libpq.rsplit("/", 1)[0] + "/voicefleet_new"
    subprocess.run(
        [str(bindir / "pg_restore"), "--no-owner", f"--dbname={new_libpq}", str(dump)],
        check=True,
    )
    restored = tmp_path / "restored"
    restored.mkdir()
    subprocess.run(["tar", "-xzf", str(files), "-C", str(restored)], check=True)
    shutil.copy2(server.data_dir / "secrets.key", restored / "secrets.key")
    server.stop()  # the old one is gone; its instances with it

    new_url = pg_url.rsplit("/", 1)[0] + "/voicefleet_new"
    again = start_server("--database-url", new_url, data_dir=restored)
    listed = vf(again, agent_dir, "secrets", "list").stdout
    assert "MARKER_DIR" in listed and "VF_TEST_SECRET" in listed
    assert api_get(again, "/agents/my-agent/flags/greeting")["value"] == "pg"
    assert len(list(restored.glob("agents/*/v1/src/agent.py"))) == 1  # from its bundle
    lk = api.LiveKitAPI(again.url, DEV_KEY, DEV_SECRET)
    try:
        call = await dispatch(lk, "after-pg-restore")
        await wait_for(job_state(again, call, "succeeded", "failed"), 120, "a call after restore")
        seen = started(markers, call)
        assert seen is not None
        assert (seen["version"], seen["secret"], seen["greeting"]) == ("v1", SECRET, "pg")
    finally:
        await lk.aclose()
