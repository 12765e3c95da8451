"""Bundles and builds: real tar files, real uv, real PyPI packages (small ones)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import tarfile
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support import Server, admin_token, wait_for
from voicefleet.build.bundle import bundle_files, create_bundle, extract_bundle
from voicefleet.build.local import LocalBuilder
from voicefleet.errors import BuildFailed, BundleRejected


def make_folder(root: Path) -> Path:
    folder = root / "agent"
    (folder / "pkg").mkdir(parents=True)
    (folder / "agent.py").write_text("print('hi')\n")
    (folder / "pkg" / "util.py").write_text("X = 1\n")
    (folder / "notes.log").write_text("ignored by .gitignore\n")
    (folder / "secret.pem").write_text("ignored by .dockerignore\n")
    (folder / ".gitignore").write_text("*.log\n")
    (folder / ".dockerignore").write_text("*.pem\n")
    for junk in (".git", ".venv", "pkg/__pycache__"):
        (folder / junk).mkdir(parents=True)
        (folder / junk / "x").write_text("junk")
    (folder / ".env").write_text("TOKEN=never-uploaded\n")
    return folder


def test_bundle_honours_ignore_files_and_always_leaves_out_vcs_envs_and_caches(
    tmp_path: Path,
) -> None:
    files = {p.as_posix() for p in bundle_files(make_folder(tmp_path))}
    assert files == {".dockerignore", ".gitignore", "agent.py", "pkg/util.py"}


def test_same_folder_same_digest_and_a_changed_file_changes_it(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    first = create_bundle(folder, tmp_path / "a.tar.gz")
    os.utime(folder / "agent.py", (1, 1))  # mtimes do not count
    assert create_bundle(folder, tmp_path / "b.tar.gz").digest == first.digest
    (folder / "agent.py").write_text("print('changed')\n")
    assert create_bundle(folder, tmp_path / "c.tar.gz").digest != first.digest


def test_round_trip_gives_back_the_same_files(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)
    info = create_bundle(folder, tmp_path / "b.tar.gz")
    out = extract_bundle(tmp_path / "b.tar.gz", tmp_path / "out")
    assert out.files == info.files == 4 and out.digest == info.digest
    assert (tmp_path / "out" / "pkg" / "util.py").read_text() == "X = 1\n"


def evil_bundle(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([(member("/etc/cron.d/x"), b"x")], "absolute path"),
        ([(member("ok.py"), b"x"), (member("../../escape.py"), b"x")], "leaves the folder"),
        ([(member("passwd", tarfile.SYMTYPE, "/etc/passwd"), b"")], "is a link"),
        ([(member("a.py"), b"x"), (member("b.py", tarfile.LNKTYPE, "a.py"), b"")], "is a link"),
        ([(member("pipe", tarfile.FIFOTYPE), b"")], "not a regular file"),
        ([(member("dev", tarfile.CHRTYPE), b"")], "not a regular file"),
    ],
)
def test_hostile_members_are_rejected_with_the_rule_and_leave_nothing(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], reason: str
) -> None:
    bundle = evil_bundle(tmp_path / "evil.tar.gz", *members)
    with pytest.raises(BundleRejected, match=reason):
        extract_bundle(bundle, tmp_path / "out" / "src")
    assert not (tmp_path / "out" / "src").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no half-extracted temp folder either
    assert not (tmp_path / "escape.py").exists()


def test_gzip_bomb_stops_at_the_size_limit(tmp_path: Path) -> None:
    zeros = b"\0" * (64 * 2**20)
    bundle = evil_bundle(tmp_path / "bomb.tar.gz", (member("zeros.bin"), zeros))
    assert bundle.stat().st_size < 2**20
    with pytest.raises(BundleRejected, match="more than 8 MB"):
        extract_bundle(bundle, tmp_path / "out", max_bytes=8 * 2**20)
    assert not (tmp_path / "out").exists()


def test_a_huge_tar_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # A PAX header of 64 MB of zeros gzips to a few kB; tarfile would read it all into memory.
    info = member("x.py")
    info.pax_headers = {"comment": "0" * (64 * 2**20)}
    bundle = tmp_path / "pax.tar.gz"
    with tarfile.open(bundle, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    assert bundle.stat().st_size < 2**20
    with pytest.raises(BundleRejected, match="tar header of"):
        extract_bundle(bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_too_many_files_and_oversized_uploads_are_rejected(tmp_path: Path) -> None:
    many = evil_bundle(tmp_path / "many.tar.gz", *((member(f"f{i}"), b"x") for i in range(30)))
    with pytest.raises(BundleRejected, match="more than 20 files"):
        extract_bundle(many, tmp_path / "a", max_files=20)
    folders = evil_bundle(
        tmp_path / "folders.tar.gz",
        (member("a.py"), b"x"),
        *((member(f"d{i}", tarfile.DIRTYPE), b"") for i in range(30)),
    )
    with pytest.raises(BundleRejected, match="more than 20 files and folders"):
        extract_bundle(folders, tmp_path / "c", max_files=20)
    with pytest.raises(BundleRejected, match="upload limit"):
        extract_bundle(many, tmp_path / "b", max_compressed=64)


@pytest.mark.parametrize("content", [b"not a tarball at all", b""])
def test_garbage_and_truncated_bundles_are_rejected(tmp_path: Path, content: bytes) -> None:
    good = evil_bundle(tmp_path / "good.tar.gz", (member("a.py"), os.urandom(50_000)))
    for i, data in enumerate([content, good.read_bytes()[:3000]]):
        path = tmp_path / f"bad{i}.tar.gz"
        path.write_bytes(data)
        with pytest.raises(BundleRejected, match=r"not a tar\.gz bundle|no files"):
            extract_bundle(path, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()


# Bundles a tar accepts but a file system does not: each name clashes with another, or is
# longer than a file name may be. The error is the server's own OSError, with its path.
CLASHING = {
    "a file under a file": [(member("a.py"), b"x"), (member("a.py/b.py"), b"x")],
    "a folder where a file is": [(member("x"), b"x"), (member("x", tarfile.DIRTYPE), b"")],
    "a file where a folder is": [(member("pkg", tarfile.DIRTYPE), b""), (member("pkg"), b"x")],
    "a name too long": [(member("a" * 300 + ".py"), b"x")],
}


@pytest.mark.parametrize("case", CLASHING)
def test_a_bundle_the_file_system_refuses_is_rejected_naming_its_member_not_a_server_path(
    tmp_path: Path, case: str
) -> None:
    bundle = evil_bundle(tmp_path / "evil.tar.gz", *CLASHING[case])
    dest = tmp_path / "data" / "agents" / "CA_1" / "v1" / "src"
    with pytest.raises(BundleRejected) as rejected:
        extract_bundle(bundle, dest)
    said = str(rejected.value)
    assert "bundle member" in said and CLASHING[case][-1][0].name[:40] in said, said
    assert str(tmp_path) not in said and "/tmp/" not in said and "data/agents" not in said, said
    assert list(dest.parent.iterdir()) == []


def test_an_uploaded_bundle_is_refused_with_no_path_of_the_server_in_the_answer(
    server: Server, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {admin_token()}"}
    r = httpx.post(f"{server.url}/api/v1/agents", json={"name": "clashing"}, headers=headers)
    assert r.status_code == 201, r.text
    bundle = evil_bundle(tmp_path / "evil.tar.gz", *CLASHING["a file under a file"])
    r = httpx.post(
        f"{server.url}/api/v1/agents/clashing/versions",
        content=bundle.read_bytes(),
        headers={**headers, "Content-Type": "application/gzip"},
    )
    assert r.status_code == 400, r.text
    said = r.json()["detail"]
    assert "a.py/b.py" in said, said
    assert str(server.data_dir) not in said and "/tmp/" not in said, said


async def test_builder_installs_requirements_once_and_reuses_the_env_when_unchanged(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "requirements.txt").write_text("six==1.16.0\n")
    builder = LocalBuilder(tmp_path / "envs")
    lines: list[str] = []
    first = await builder.build(source, lines.append)
    assert not first.cached
    assert any("six==1.16.0" in line for line in lines)
    probe = await _run(first.python, "-c", "import six; print(six.__version__)")
    assert probe == "1.16.0"

    again: list[str] = []
    second = await builder.build(source, again.append)
    assert second.cached and second.env_dir == first.env_dir
    assert not any(line.startswith("$ uv") for line in again)  # nothing ran

    (source / "requirements.txt").write_text("six==1.16.0\nsix\n")
    third = await builder.build(source, lines.append)
    assert third.dependency_digest != first.dependency_digest


async def test_pyproject_and_no_dependency_file_build(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "pyproject.toml").write_text(
        '[project]\nname = "a"\nversion = "0"\ndependencies = ["six==1.16.0"]\n'
    )
    built = await LocalBuilder(tmp_path / "envs").build(source, lambda _: None)
    assert await _run(built.python, "-c", "import six; print('ok')") == "ok"
    (source / "pyproject.toml").unlink()
    warned: list[str] = []
    empty = await LocalBuilder(tmp_path / "envs2").build(source, warned.append)
    assert empty.python.exists() and any("no packages installed" in w for w in warned)


async def test_failed_build_says_why_and_leaves_no_env(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "requirements.txt").write_text("this-package-does-not-exist-vf==1.0\n")
    with pytest.raises(BuildFailed, match="this-package-does-not-exist-vf"):
        await LocalBuilder(tmp_path / "envs").build(source, lambda _: None)
    assert [p.name for p in (tmp_path / "envs").iterdir() if not p.name.endswith(".lock")] == []


async def test_a_dependency_file_that_is_not_a_file_fails_the_build_naming_it_only(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src"
    (source / "requirements.txt").mkdir(parents=True)  # a bundle may hold a folder by that name
    with pytest.raises(BuildFailed) as failed:
        await LocalBuilder(tmp_path / "envs").build(source, lambda _: None)
    assert str(failed.value) == "requirements.txt cannot be read (Is a directory)"


async def test_a_relative_cache_dir_builds_there_and_never_in_the_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "agent.py").write_text("")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # uv runs in the sources: "envs" means another folder
    built = await LocalBuilder(Path("envs")).build(source, lambda _: None)
    assert built.env_dir.parent == tmp_path / "cwd" / "envs"
    assert built.python.is_absolute() and built.python.exists()
    assert [p.name for p in source.iterdir()] == ["agent.py"]


async def _run(*cmd: object) -> str:
    import asyncio

    proc = await asyncio.create_subprocess_exec(*map(str, cmd), stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()


async def test_a_cancelled_build_stops_its_tool_and_leaves_nothing_half_built(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "requirements.txt").write_text("livekit-agents==1.8.9\nsix==1.16.0\n")  # seconds
    builder = LocalBuilder(tmp_path / "envs")
    lines: list[str] = []
    build = asyncio.create_task(builder.build(source, lines.append))

    def alive(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def installing() -> list[psutil.Process]:
        found = []
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if alive(p) and "install" in p.cmdline():
                    found.append(p)
        return found

    tools = await wait_for(installing, 60, "uv pip install to run")
    build.cancel()  # as a server shutdown does
    with pytest.raises(asyncio.CancelledError):
        await build
    assert not any(alive(p) for p in tools)
    assert [p.name for p in (tmp_path / "envs").iterdir() if p.is_dir()] == []
