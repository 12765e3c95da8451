"""A real Kubernetes control plane for tests, with fake nodes: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, and kwok playing the kubelets.

    with kube_cluster(tmp_path / "kube", nodes=2) as kube:
        async with lightkube.AsyncClient(kube.config()) as client:
            ...

Each cluster lives in a directory of its own (certificates, etcd's data, a kubeconfig, each
process's log) and listens on 127.0.0.1 only, on free ports. The certificates are made here: a CA,
the API server's serving certificate, a client certificate for the admin (system:masters), the
controller manager, the scheduler and kwok, and the service-account signing key;
`kube.kubeconfig_for(user, groups)` makes one for any other user (RBAC is on). Every process is
stopped by pid, ending with SIGKILL, when the `with` block ends, failed test or not.

The binaries come from `scripts/peers kube` (built from their Go modules and cached); they are
never built from here (the first build takes many minutes): `require_binaries()` skips the test
with the reason when they are missing.

kwok runs with the stages kwokctl gives it by default: a node it manages becomes Ready at once and
keeps its lease; a pod bound to such a node becomes Running and Ready at once (no image is pulled,
no container runs), and a pod being deleted is removed at once.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import itertools
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lightkube import ApiError, AsyncClient, KubeConfig, codecs
from lightkube.models.core_v1 import NamespaceSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.models.rbac_v1 import Subject
from lightkube.resources.core_v1 import Namespace, ServiceAccount
from lightkube.resources.rbac_authorization_v1 import RoleBinding

from tests.support import with_us

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "scripts" / "peers"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# The annotation that marks a node as kwok's (kwok manages only nodes that carry it).
KWOK_NODE = "kwok.x-k8s.io/node"
SERVICE_CIDR = "10.96.0.0/16"  # never routed: no kube-proxy, no pod network


class KubeUnavailable(RuntimeError):
    """The control-plane binaries are not built (the message says how to build them)."""


def binaries() -> dict[str, Path]:
    """Where `scripts/peers` built each binary; KubeUnavailable when any is missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in BINARIES:
        out = subprocess.run([str(PEERS), "path", name], capture_output=True, text=True)
        if out.returncode == 0:
            found[name] = Path(out.stdout.strip())
        else:
            missing.append(name)
    if missing:
        raise KubeUnavailable(
            f"{', '.join(missing)} not built: run `scripts/peers kube` (the first build takes "
            "about 15 minutes on 2 cores; then it is cached)"
        )
    return found


def require_binaries() -> dict[str, Path]:
    """The binaries, or skip the calling test with the reason."""
    import pytest

    try:
        return binaries()
    except KubeUnavailable as e:
        pytest.skip(str(e))


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 now (all held open together while picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


# --- certificates ----------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(cn: str, orgs: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in orgs]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls) -> CA:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        name = _name("voicefleet-test-ca")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(
        self,
        dir: Path,
        stem: str,
        cn: str,
        *,
        orgs: Sequence[str] = (),
        server_names: Sequence[str] = (),
        server_ips: Sequence[str] = (),
    ) -> tuple[Path, Path]:
        """A key and a certificate signed by this CA, as `dir/stem.key` and `dir/stem.crt`: a
        server's when names or addresses are given, else a client's (CN: user, O: groups)."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        server = bool(server_names or server_ips)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn, orgs))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if server:
            sans: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_path, cert_path = dir / f"{stem}.key", dir / f"{stem}.crt"
        _write_key(key_path, key)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return key_path, cert_path


def _kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    """A kubeconfig for one user (JSON is YAML: no YAML writer needed)."""
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "kube",
                        "cluster": {"server": server, "certificate-authority": str(ca)},
                    }
                ],
                "users": [
                    {
                        "name": user,
                        "user": {"client-certificate": str(cert), "client-key": str(key)},
                    }
                ],
                "contexts": [{"name": "kube", "context": {"cluster": "kube", "user": user}}],
                "current-context": "kube",
            },
            indent=1,
        )
    )
    path.chmod(0o600)
    return path


# --- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace`; by pid only (each was started here)."""
        p = self.popen
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.wait()


@dataclass
class Cluster:
    """A running control plane. `server`: the API server's https URL; `kubeconfig`: the
    admin's (system:masters); `nodes`: the fake nodes' names."""

    dir: Path
    server: str
    authority: CA
    ca: Path
    kubeconfig: Path
    admin_cert: Path
    admin_key: Path
    nodes: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    def config(self) -> KubeConfig:
        """The admin's kubeconfig as lightkube's KubeConfig."""
        return KubeConfig.from_file(self.kubeconfig)

    def kubeconfig_for(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig for another user, authenticated by a client certificate from the
        cluster's CA (CN: `user`, O: each group); RBAC decides what it may do."""
        stem = "user-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        key, crt = self.authority.issue(self.dir / "pki", stem, user, orgs=groups)
        return _kubeconfig(self.dir / f"{stem}.kubeconfig", self.server, self.ca, crt, key, user)

    def http(self) -> httpx.Client:
        """A plain HTTP client for the API server, as the admin."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return httpx.Client(base_url=self.server, verify=ctx, timeout=10)

    def logs(self) -> str:
        """The last lines of each process's log, for a failure message."""
        return "\n".join(
            f"--- {p.name} (pid {p.popen.pid}, {p.log}):\n{p.tail()}" for p in self.procs
        )

    def check_running(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise RuntimeError(
                    f"{p.name} exited ({p.popen.returncode}):\n{p.tail(40)}\n(log: {p.log})"
                )

    def start(
        self, name: str, argv: Sequence[str | Path], env: dict[str, str] | None = None
    ) -> Proc:
        log = self.dir / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        with log.open("wb") as out:
            popen = subprocess.Popen(
                with_us([str(a) for a in argv]),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env={**os.environ, **(env or {})},
                start_new_session=True,  # a test's Ctrl-C reaches the test, which stops them
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Stop every process, the last started first."""
        for p in reversed(self.procs):
            p.stop()

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        """Poll `check` (startup only), failing early if a process died."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_running()
            with contextlib.suppress(httpx.HTTPError, OSError):
                if check():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not after {timeout:.0f}s\n{self.logs()}")
            time.sleep(0.1)

    def add_node(self, client: httpx.Client, name: str) -> None:
        """A fake node for kwok: marked as kwok's, with room for many pods, and no taint (every
        node here is fake: pods need no toleration)."""
        room = {"cpu": "32", "memory": "256Gi", "pods": "110"}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_NODE: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/arch": "amd64",
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "type": "kwok",
                },
            },
            "status": {"allocatable": room, "capacity": room, "phase": "Running"},
        }
        client.post("/api/v1/nodes", json=node).raise_for_status()
        self.nodes.append(name)


def _ok(client: httpx.Client, path: str) -> bool:
    return client.get(path).status_code == 200


@contextlib.contextmanager
def kube_cluster(dir: Path, nodes: int = 2) -> Iterator[Cluster]:
    """Start a control plane with `nodes` fake nodes in `dir` (made if missing); stop it all at
    the end. Returns once the API server is ready, the controllers and the scheduler answer, the
    nodes are Ready and the `default` namespace has its service account (pods can be created)."""
    bins = binaries()
    dir.mkdir(parents=True, exist_ok=True)
    pki = dir / "pki"
    pki.mkdir(exist_ok=True)
    etcd_port, peer_port, api_port, kcm_port, sched_port, kwok_port = free_ports(6)
    server = f"https://127.0.0.1:{api_port}"

    ca = CA.make()
    ca_crt = pki / "ca.crt"
    ca_crt.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    api_key, api_crt = ca.issue(
        pki, "apiserver", "kube-apiserver",
        server_names=[
            "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        server_ips=["127.0.0.1", str(ipaddress.ip_network(SERVICE_CIDR)[1])],
    )  # fmt: skip
    sa_key = _key()
    _write_key(pki / "sa.key", sa_key)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    kubeconfigs: dict[str, Path] = {}
    for user, cn, org in [
        ("admin", "kubernetes-admin", ["system:masters"]),
        ("controller-manager", "system:kube-controller-manager", []),
        ("scheduler", "system:kube-scheduler", []),
        ("kwok", "kwok", ["system:masters"]),
    ]:
        key, crt = ca.issue(pki, user, cn, orgs=org)
        kubeconfigs[user] = _kubeconfig(dir / f"{user}.kubeconfig", server, ca_crt, crt, key, cn)

    cluster = Cluster(
        dir=dir,
        server=server,
        authority=ca,
        ca=ca_crt,
        kubeconfig=kubeconfigs["admin"],
        admin_cert=pki / "admin.crt",
        admin_key=pki / "admin.key",
    )
    try:
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        cluster.start("etcd", [
            bins["etcd"], "--name=default", f"--data-dir={dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}", "--initial-cluster-state=new",
            # A test's cluster is thrown away: no fsync, no metrics listener of its own.
            "--unsafe-no-fsync", "--log-level=warn",
        ])  # fmt: skip
        with httpx.Client(timeout=2) as plain:
            cluster.wait(lambda: _ok(plain, f"{etcd_url}/health"), "etcd healthy", 30)

        cluster.start("kube-apiserver", [
            bins["kube-apiserver"], f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", f"--secure-port={api_port}",
            "--advertise-address=127.0.0.1",
            # The `kubernetes` service's endpoint cannot be a loopback address: keep none.
            "--endpoint-reconciler-type=none",
            f"--tls-cert-file={api_crt}", f"--tls-private-key-file={api_key}",
            f"--client-ca-file={ca_crt}",
            "--authorization-mode=Node,RBAC", "--anonymous-auth=false",
            # As kubeadm, kind and k3s: deploy/kubernetes/server.yaml's builder is privileged.
            "--allow-privileged=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--cert-dir={dir / 'apiserver-certs'}",
            "--profiling=false", "--v=1",
        ])  # fmt: skip
        with cluster.http() as client:
            cluster.wait(lambda: _ok(client, "/readyz"), "kube-apiserver ready (/readyz)", 90)

            cluster.start("kube-controller-manager", [
                bins["kube-controller-manager"],
                f"--kubeconfig={kubeconfigs['controller-manager']}",
                "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
                f"--cert-dir={dir / 'controller-manager-certs'}", "--leader-elect=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                # Each controller as its own service account, with the bootstrap policy's role
                # for it (system:kube-controller-manager itself may do little else).
                f"--root-ca-file={ca_crt}", "--use-service-account-credentials=true",
                "--profiling=false", "--v=1",
            ])  # fmt: skip
            cluster.start("kube-scheduler", [
                bins["kube-scheduler"], f"--kubeconfig={kubeconfigs['scheduler']}",
                "--bind-address=127.0.0.1", f"--secure-port={sched_port}",
                f"--cert-dir={dir / 'scheduler-certs'}", "--leader-elect=false",
                "--profiling=false", "--v=1",
            ])  # fmt: skip
            stages = bins["kwok"].parent / "stages"
            cluster.start(
                "kwok",
                [
                    bins["kwok"], f"--kubeconfig={kubeconfigs['kwok']}",
                    f"--manage-nodes-with-annotation-selector={KWOK_NODE}=fake",
                    "--node-lease-duration-seconds=40", "--node-ip=127.0.0.1",
                    f"--server-address=127.0.0.1:{kwok_port}",
                    *(f"--config={p}" for p in sorted(stages.glob("*.yaml"))),
                ],
                env={"HOME": str(dir)},  # no ~/.kwok/kwok.yaml of the user's
            )  # fmt: skip
            for i in range(nodes):
                cluster.add_node(client, f"kwok-node-{i}")

            with httpx.Client(verify=False, timeout=2) as local:  # their self-signed certificates
                cluster.wait(
                    lambda: _ok(local, f"https://127.0.0.1:{kcm_port}/healthz"),
                    "kube-controller-manager healthy",
                )
                cluster.wait(
                    lambda: _ok(local, f"https://127.0.0.1:{sched_port}/readyz"),
                    "kube-scheduler ready",
                )

            def nodes_ready() -> bool:
                items = client.get("/api/v1/nodes").json()["items"]
                ready = {
                    n["metadata"]["name"]
                    for n in items
                    for c in n.get("status", {}).get("conditions", [])
                    if c["type"] == "Ready" and c["status"] == "True"
                }
                return ready >= set(cluster.nodes)

            cluster.wait(nodes_ready, f"kwok's nodes Ready ({', '.join(cluster.nodes)})")
            cluster.wait(
                lambda: _ok(client, "/api/v1/namespaces/default/serviceaccounts/default"),
                "the default service account (made by the controller manager)",
            )
        yield cluster
    finally:
        cluster.stop()


# --- namespaces for voicefleet -----------------------------------------------------------------

RBAC = ROOT / "deploy" / "kubernetes" / "rbac.yaml"
_namespaces = itertools.count()


@contextlib.asynccontextmanager
async def admin(kube: Cluster, namespace: str | None = None) -> AsyncIterator[AsyncClient]:
    """An async client as the cluster's admin."""
    client = AsyncClient(kube.config(), namespace=namespace, field_manager="voicefleet-test")
    try:
        yield client
    finally:
        await client.close()


async def make_namespace(kube: Cluster, user: str | None = None) -> str:
    """A fresh namespace, with its `default` service account (made here, not waited for), and
    deploy/kubernetes/rbac.yaml's Role in it, bound to `user` too."""
    ns = f"vf-{os.getpid()}-{next(_namespaces)}"
    async with admin(kube, ns) as client:
        await client.create(Namespace(metadata=ObjectMeta(name=ns), spec=NamespaceSpec()))
        with contextlib.suppress(ApiError):  # the controller manager may have been first
            await client.create(ServiceAccount(metadata=ObjectMeta(name="default")))
        text = RBAC.read_text().replace("namespace: voicefleet\n", f"namespace: {ns}\n")
        for obj in codecs.load_all_yaml(text):
            if isinstance(obj, RoleBinding) and user is not None:
                obj.subjects = [
                    *(obj.subjects or []),
                    Subject(kind="User", name=user, apiGroup="rbac.authorization.k8s.io"),
                ]
            await client.create(obj)
    return ns
