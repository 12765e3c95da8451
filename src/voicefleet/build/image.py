"""The image builder: an agent folder into an OCI image with buildah (no daemon), and a push.

`ImageBuilder.build` builds the folder's own Dockerfile, or the one `dockerfile.render` makes
for it, from a build context holding exactly the files a bundle of the folder holds (its
.gitignore and .dockerignore honoured, virtual environments and caches left out). buildah keeps
each step's layer (`--layers`): a rebuild after a change to the agent's code alone reuses the
dependency layers. Every line buildah prints goes to `write_line`; a failed build raises
BuildFailed with the step that failed and the log's last lines.

The base image is passed as the build argument BASE_IMAGE (the generated Dockerfiles' FROM):
LiveKit's python:3.11-slim / node:20-slim by default, or a local one (`scripts/base-image`)
where no registry serves those. `push` copies an image to a registry and gives the reference
by digest (`registry/name@sha256:…`) that a pod should run: the same bytes whatever the tag
later points at.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from voicefleet.build.bundle import bundle_files
from voicefleet.build.dockerfile import render
from voicefleet.errors import BuildFailed

Log = Callable[[str], None]
TAIL = 30  # lines of the log a BuildFailed carries
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's, in the base images


@dataclass(frozen=True)
class ImageArtifact:
    ref: str  # as built: name:tag; as pushed: registry/name@sha256:…
    digest: str  # sha256:… of the image's manifest
    size: int  # bytes: the sum of the layers the manifest lists


def find_buildah() -> str:
    found = shutil.which("buildah")
    if found is None:
        raise BuildFailed("buildah is not installed (apt-get install buildah)")
    return found


def host_ca_bundle() -> Path | None:
    """The certificate bundle this machine's own TLS clients trust (SSL_CERT_FILE, else
    OpenSSL's default), for `ImageBuilder(ca_bundle=…)`."""
    for candidate in (os.environ.get("SSL_CERT_FILE"), ssl.get_default_verify_paths().cafile):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


# A reference as the distribution registry's grammar has it (docker/distribution reference):
# [host[:port]/]path[:tag][@sha256:hex], the path's parts lowercase with single separators.
_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST = (
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])"
    r"(?::[0-9]+)?"
)
REFERENCE = re.compile(
    rf"^(?:{_HOST}/)?{_PART}(?:/{_PART})*(?::[\w][\w.-]{{0,127}})?(?:@sha256:[0-9a-f]{{64}})?$"
)


def check_reference(ref: str) -> str:
    """`ref` if it is an image reference a container runtime accepts; else ValueError."""
    if len(ref) > 512 or not REFERENCE.match(ref):
        raise ValueError(
            f"'{ref}' is not an image reference like registry.example.com/team/agent:v1 "
            "or …/agent@sha256:<64 hex>"
        )
    return ref


def repository_name(name: str) -> str:
    """An agent's name as one part of a repository path (lowercase, single separators)."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower())
    cleaned = re.sub(r"[._-]{2,}", "-", cleaned).strip("._-")
    return cleaned or "agent"


def split_ref(ref: str) -> tuple[str, str]:
    """'localhost/bot:v2' -> ('bot', 'v2'); 'reg:5000/a/b' -> ('a/b', 'latest'). The
    repository path without its registry host (a first part with '.' or ':', or localhost)."""
    name, _, digest = ref.partition("@")
    head, _, tail = name.rpartition("/")
    tag = "latest"
    if ":" in tail:
        tail, tag = tail.split(":", 1)
    name = f"{head}/{tail}" if head else tail
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest
    return name, digest or tag


class ImageBuilder:
    def __init__(
        self,
        base: str | None = None,
        *,
        buildah: str | None = None,
        work_dir: Path | None = None,
        isolation: str | None = None,
        global_args: Sequence[str] = (),
        ca_bundle: Path | None = None,
    ) -> None:
        """`base`: the base image (None: the Dockerfile's own default). `work_dir`: where build
        contexts are staged (the system's temporary folder by default). `isolation`: buildah's
        (oci, chroot). `global_args`: buildah's own options, e.g. --root and --runroot.
        `ca_bundle`: a certificate bundle mounted, read-only, over the system's
        (/etc/ssl/certs/ca-certificates.crt) in every RUN step, e.g. `host_ca_bundle()` where
        the way to PyPI passes a TLS-inspecting proxy; it is not in any layer of the image."""
        self.base = base
        self.ca_bundle = ca_bundle
        self.buildah = buildah
        self.work_dir = work_dir
        self.isolation = isolation
        self.global_args = tuple(global_args)

    async def build(self, source_dir: Path, tag: str, write_line: Log) -> ImageArtifact:
        source_dir = source_dir.absolute()
        buildah = self.buildah or find_buildah()
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="vf-image-", dir=self.work_dir))
        try:
            context = work / "context"
            await asyncio.to_thread(stage_context, source_dir, context)
            if (context / "Dockerfile").is_file():
                dockerfile = context / "Dockerfile"
                write_line("building the folder's own Dockerfile")
            else:
                recipe = render(source_dir)  # the base comes as a build argument
                dockerfile = work / "Dockerfile"
                dockerfile.write_text(recipe.text)
                write_line(f"no Dockerfile: building voicefleet's {recipe.kind} recipe")
            iidfile = work / "iid"
            cmd = [
                buildah, *self.global_args, "bud", "--layers", "--force-rm", "--pull=false",
                "-f", str(dockerfile), "-t", tag, "--iidfile", str(iidfile),
            ]  # fmt: skip
            if self.base:
                cmd += ["--build-arg", f"BASE_IMAGE={self.base}"]
            if self.isolation:
                cmd += ["--isolation", self.isolation]
            if self.ca_bundle is not None:
                cmd += ["--volume", f"{self.ca_bundle.resolve()}:{SYSTEM_CA_BUNDLE}:ro"]
            await self._run([*cmd, str(context)], write_line, "the image build")
            image_id = iidfile.read_text().strip()
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)
        digest, size = await self.inspect(image_id)
        write_line(f"image {tag} built: {digest} ({size / 2**20:.1f} MiB)")
        return ImageArtifact(tag, digest, size)

    async def inspect(self, ref: str) -> tuple[str, int]:
        """The manifest digest and the layers' total size of a local image."""
        buildah = self.buildah or find_buildah()
        out = await self._output([buildah, *self.global_args, "inspect", "--type", "image", ref])
        info = json.loads(out)
        manifest = json.loads(info.get("Manifest") or "{}")
        size = sum(int(layer.get("size", 0)) for layer in manifest.get("layers", []))
        return str(info.get("FromImageDigest", "")), size

    async def push(
        self,
        ref: str,
        registry: str,
        write_line: Log | None = None,
        *,
        tls_verify: bool = True,
        authfile: Path | None = None,
    ) -> ImageArtifact:
        """Push the local image `ref` to `registry` (host[:port][/prefix]) under the same
        repository name and tag; the artifact's ref is by digest: registry/name@sha256:….
        `tls_verify` False: plain HTTP, or TLS unverified; `authfile`: the registry's
        credentials (containers-auth.json, or Docker's config.json)."""
        buildah = self.buildah or find_buildah()
        name, tag = split_ref(ref)
        dest = f"{registry.rstrip('/')}/{name}"
        with tempfile.TemporaryDirectory(prefix="vf-push-", dir=self.work_dir) as tmp:
            digestfile = Path(tmp) / "digest"
            cmd = [
                buildah, *self.global_args, "push", f"--tls-verify={str(tls_verify).lower()}",
                "--digestfile", str(digestfile),
            ]  # fmt: skip
            if authfile is not None:
                cmd += ["--authfile", str(authfile)]
            cmd += [ref, f"docker://{dest}:{tag}"]
            await self._run(cmd, write_line or (lambda line: None), "the push")
            digest = digestfile.read_text().strip()
        _, size = await self.inspect(ref)
        return ImageArtifact(f"{dest}@{digest}", digest, size)

    async def _output(self, cmd: list[str]) -> str:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise BuildFailed(f"{' '.join(cmd[1:3])} failed: {err.decode(errors='replace')}")
        return out.decode()

    async def _run(self, cmd: list[str], write_line: Log, what: str) -> None:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "NO_COLOR": "1", "BUILDAH_LAYERS": "true"},
            start_new_session=True,  # a group of its own: the steps' processes end with it
        )
        tail: deque[str] = deque(maxlen=TAIL)
        failed_step = ""
        try:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                if not line.startswith("--> Using cache"):  # the tail is for what went wrong
                    tail.append(line)
                # buildah's own last word: the step that failed, or why a push did.
                if "building at STEP" in line or line.startswith(("error building", "Error: ")):
                    failed_step = line
                write_line(line)
            code = await proc.wait()
        except BaseException:  # cancelled (a server shutdown): leave no buildah behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        if code != 0:
            reason = failed_step.removeprefix("Error: ") or f"buildah exited with {code}"
            raise BuildFailed(
                f"{what} failed: {reason}\n--- the last lines of its log ---\n" + "\n".join(tail)
            )


def stage_context(source_dir: Path, context: Path) -> None:
    """Copy the files a bundle of `source_dir` holds into `context` (modes and times kept)."""
    context.mkdir(parents=True)
    for rel in bundle_files(source_dir):
        src = source_dir / rel
        if not src.is_file():
            continue
        dest = context / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
