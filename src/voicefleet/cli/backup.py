"""`vf server backup` and `vf server restore`: a data dir to one file and back
(voicefleet.control.backup says what the file holds and what it leaves out)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from voicefleet.errors import BackupRejected, VoicefleetError

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

DataDir = Annotated[
    Path, typer.Option(envvar="VF_DATA_DIR", help="The server's data dir (its --data-dir).")
]


def backup(
    file: Annotated[Path, typer.Argument(help="The backup to write (a .tar.gz; replaced).")],
    data_dir: DataDir = Path(".voicefleet"),
) -> None:
    """Back up a data dir: its SQLite store and every version's sources, in one file.

    The store is copied consistently while the server runs and writes.

    NOT in the backup: secrets.key (and credentials.json). Keep a copy of them apart.
    """
    from voicefleet.control.backup import backup as run

    # Compressing takes a core for a while: the server's own work goes first.
    with contextlib.suppress(OSError):
        os.nice(10)
    data_dir = data_dir.expanduser().resolve()
    try:
        report = run(data_dir, file.expanduser())
    except VoicefleetError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from None
    out.print(
        f"Backed up {report.contents.summary()} to {escape(str(report.path))} "
        f"({report.bytes / 2**20:.1f} MB, mode 0600)."
    )
    for missing in report.missing:
        err.print(f"[yellow]warning:[/yellow] no bundle for {missing}: it cannot be restored")
    secrets = report.contents.secrets
    err.print(
        f"[bold yellow]NOT IN THIS BACKUP: {data_dir / 'secrets.key'}[/bold yellow], the key "
        f"that decrypts the {secrets} secret(s) in it. Without that key they are lost: keep a "
        "copy of it somewhere safe, apart from the backups (it never changes; one copy serves "
        "every backup)."
    )
    if any(p.name == "credentials.json" for p in report.kept_apart):
        err.print(
            f"[bold yellow]NOT IN THIS BACKUP: {data_dir / 'credentials.json'}[/bold yellow], "
            "the project's API key and secret: keep a copy with the key, or a restored server "
            "makes new ones and your workers and clients are refused."
        )


def restore(
    file: Annotated[Path, typer.Argument(help="A backup made by `vf server backup`.")],
    data_dir: Annotated[
        Path,
        typer.Option(help="The data dir to restore into: new or empty, or --force."),
    ],
    force: Annotated[
        bool,
        typer.Option(
            help="Restore into a data dir that is not empty: its store and the backup's "
            "versions are replaced (its secrets.key and credentials are kept). Stop its server "
            "first."
        ),
    ] = False,
    drop_secrets: Annotated[
        bool,
        typer.Option(
            help="Leave the secrets out (their key is lost): the names are listed, to set again."
        ),
    ] = False,
) -> None:
    """Restore a backup into a new (or empty) data dir.

    Then copy in the secrets.key of the data dir the backup was taken of.

    Start `vf server --data-dir` there: its first start builds the environments again.
    """
    from voicefleet.control.restore import restore as run

    target = data_dir.expanduser().resolve()
    try:
        report = run(file.expanduser(), target, force=force, drop_secrets=drop_secrets)
    except BackupRejected as e:
        err.print(f"[red]error:[/red] {escape(str(file))} cannot be restored: {escape(str(e))}")
        raise typer.Exit(1) from None
    except VoicefleetError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from None
    taken = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.taken_at))
    out.print(
        f"Restored {report.contents.summary()} into {escape(str(target))} (a backup of "
        f"{escape(report.source)} taken {taken})."
    )
    out.print(
        "Built environments are not in backups: `vf server` builds them again from the "
        "versions' sources at its first start here (uv needs the package index)."
    )
    if report.sessions_closed:
        out.print(
            f"{report.sessions_closed} session(s) open when the backup was taken are recorded "
            "as failed: the restored server does not dispatch them again."
        )
    for agent, names in report.dropped_secrets.items():
        out.print(f"Secrets of {agent} left out (set them again): {', '.join(names)}")
    secrets = report.contents.secrets
    key = target / "secrets.key"
    if secrets and not key.exists():
        err.print(
            f"[bold red]SECRETS CANNOT BE DECRYPTED YET:[/bold red] {key} is missing. The "
            f"{secrets} secret(s) restored are encrypted with the secrets.key of "
            f"{escape(report.source)}, which backups do not hold: copy it to {key} (chmod 600) "
            "before starting the server, which refuses to start without it. If that key is "
            "lost, restore again with --drop-secrets and set them again."
        )
    elif secrets and report.key_opens is False:
        err.print(
            f"[bold red]SECRETS CANNOT BE DECRYPTED:[/bold red] {key} is not the key the "
            f"{secrets} restored secret(s) were encrypted with: copy the secrets.key of "
            f"{escape(report.source)} over it."
        )
    if "credentials.json" in report.missing:
        err.print(
            f"[bold yellow]credentials.json is missing:[/bold yellow] copy the one of "
            f"{escape(report.source)} to {target / 'credentials.json'}, or the server makes new "
            "project credentials and workers and clients using the old ones are refused."
        )
