"""How `vf agent` reads --secrets, --secrets-file and --secret-mount, in-process (the CLI and
server end to end: tests/test_cli_parity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from voicefleet.cli.secrets_input import BadSecrets, gather, parse_pairs


def test_pairs_split_only_where_another_name_begins() -> None:
    assert parse_pairs(["A=1,B=2", "URL=http://x/?a=1&b=2,3", "C="]) == {
        "A": "1", "B": "2", "URL": "http://x/?a=1&b=2,3", "C": "",
    }  # fmt: skip
    # A value holding ",NAME=" is two pairs here: such a value goes in --secrets-file.
    assert parse_pairs(["Q=a=1,b=2"]) == {"Q": "a=1", "b": "2"}
    assert parse_pairs(["LIST=x,y,Z=3"]) == {"LIST": "x,y", "Z": "3"}
    for bad in ("novalue", "=x", "1A=x", "A B=x"):
        with pytest.raises(BadSecrets):
            parse_pairs([bad])


def test_a_file_as_dotenv_reads_it_and_flags_win_livekit_names_skipped(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text('# comment\nexport A="quoted value"\nB=from-file\nLIVEKIT_API_KEY=k\n\nEMPTY=\n')
    given = gather(["B=from-flag"], env, None, ignore_empty=True)
    assert given.env == {"A": "quoted value", "B": "from-flag"}
    assert sorted(given.skipped) == ["EMPTY", "LIVEKIT_API_KEY"]
    with pytest.raises(BadSecrets, match="EMPTY is empty"):
        gather(None, env, None)
    assert gather(None, env, None, allow_empty=True).env["EMPTY"] == ""


def test_mounted_files_are_named_by_their_file_and_checked(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "key.pem").write_bytes(b"\x00binary\xff")
    (tmp_path / "b" / "key.pem").write_bytes(b"other")
    assert gather(None, None, [tmp_path / "a" / "key.pem"]).files == {"key.pem": b"\x00binary\xff"}
    with pytest.raises(BadSecrets, match=r"two files named key\.pem"):
        gather(None, None, [tmp_path / "a" / "key.pem", tmp_path / "b" / "key.pem"])
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    with pytest.raises(BadSecrets, match="more than the 1 MiB"):
        gather(None, None, [big])
    odd = tmp_path / "with space.txt"
    odd.write_text("x")
    with pytest.raises(BadSecrets, match="its name must be"):
        gather(None, None, [odd])
    with pytest.raises(BadSecrets, match="both as a value and as a file"):
        gather(["KEY=x"], None, [_named(tmp_path, "KEY")])


def _named(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text("content")
    return path
