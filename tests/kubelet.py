"""A real node for the test control plane (tests/kube.py): the kubelet, containerd and runc.

    with kube_cluster(tmp / "kube", nodes=0) as kube, images.registry(tmp / "reg") as reg:
        with real_node(kube, tmp / "node", reg) as node:
            ...  # pods scheduled to node.name run as containers

The kubelet is built from the Kubernetes sources with cgo (`scripts/peers build kubelet`);
containerd and runc are Debian's, and so are the CNI plugins (containernetworking-plugins).
Everything lives in the node's own directory: containerd's root, state and socket, the kubelet's
root directory, their configurations and logs. Nothing listens beyond 127.0.0.1 but the pods'
network: a bridge of the node's own (its name and a /24 picked free here) whose gateway address
is the host's side, so a server the pods must reach listens on `node.host_ip`.

This machine shapes the configuration (each point is what stopped the defaults here):
- cgroup v1 (a hybrid hierarchy): the kubelet refuses it since 1.31 unless `failCgroupV1: false`.
- no systemd: the cgroupfs driver, for the kubelet and for runc; the pods' cgroups go under a
  cgroup root of this node's own, so two nodes (or two test runs) never share one.
- no CAP_SYS_RESOURCE: a process may raise its oom_score_adj but never lower it, so containerd
  runs with `restrict_oom_score_adj` and the kubelet with `oomScoreAdj: 0`.
- no registry beyond the local one: the sandbox ("pause") image is kubernetes' own pause.c,
  compiled here (static) and pushed to the local registry, which containerd reaches over plain
  HTTP (its hosts.toml).
- iptables: the kubelet makes none of its chains (no kube-proxy runs; the bridge does no NAT).

Every process is stopped by pid when the `with` block ends; the containers (every process in the
node's cgroups) and containerd's shims too, and the bridge and the cgroups are deleted. Two paths
are the kubelet's own and fixed: /var/log/containers, where it links each container's log (the
links into this node go with it), and /var/lib/kubelet/device-plugins, its device-plugin socket
and checkpoint (shared by every kubelet here; no device plugin runs).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.kube import Cluster, Proc, _kubeconfig, free_ports
from tests.support import with_us

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "scripts" / "peers"
CNI_BIN = Path("/usr/lib/cni")
PAUSE_TAG = "pause:3.10"
LEGACY_LOGS = "/var/log/containers"  # the kubelet's, not configurable


class NodeUnavailable(RuntimeError):
    """Something a real node needs is missing here (the message says what and how to get it)."""


def _peer(name: str) -> Path:
    out = subprocess.run([str(PEERS), "path", name], capture_output=True, text=True)
    if out.returncode != 0:
        raise NodeUnavailable(
            f"{name} not built: run `scripts/peers build {name}` (about 12 minutes; then cached)"
        )
    return Path(out.stdout.strip())


def requirements() -> dict[str, Path]:
    """The programs a real node runs; NodeUnavailable, saying what is missing, otherwise."""
    if os.geteuid() != 0:
        raise NodeUnavailable("a real node runs as root (containerd, runc, mounts, cgroups)")
    found = {"kubelet": _peer("kubelet")}
    missing = []
    for tool, package in [
        ("containerd", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("runc", "runc"),
        ("buildah", "buildah"),
        ("gcc", "gcc"),
    ]:
        path = shutil.which(tool) or (
            f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
        )
        if path is None:
            missing.append(package)
        else:
            found[tool] = Path(path)
    _go()
    if not (CNI_BIN / "bridge").exists():
        missing.append("containernetworking-plugins")
    if missing:
        raise NodeUnavailable(
            f"not installed: {', '.join(sorted(set(missing)))} (Debian packages: "
            f"apt-get install {' '.join(sorted(set(missing)))})"
        )
    return found


def require() -> dict[str, Path]:
    """The programs, or skip the calling test with the reason."""
    import pytest

    try:
        return requirements()
    except NodeUnavailable as e:
        pytest.skip(str(e))


def _go() -> str:
    found = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    if found is None:
        raise NodeUnavailable("Go not found (on PATH or in /usr/local/go/bin): it fetches pause.c")
    return found


def _kubernetes_source(version: str) -> Path:
    """The k8s.io/kubernetes module's source at `version`, from Go's module cache (fetched from
    the module proxy if missing: building the kubelet put it there)."""
    out = subprocess.run(
        [_go(), "mod", "download", "-json", f"k8s.io/kubernetes@{version}"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise NodeUnavailable(
            f"go mod download k8s.io/kubernetes@{version}: {out.stdout}{out.stderr}"
        )
    return Path(json.loads(out.stdout)["Dir"])


# --- the sandbox image -------------------------------------------------------------------------


def pause_image(registry: str, work: Path) -> str:
    """Kubernetes' pause (build/pause/linux/pause.c of the kubelet's own module version),
    compiled static and pushed to `registry` as a one-file image; its reference."""
    version = subprocess.run(
        [str(PEERS), "version", "kubelet"], capture_output=True, text=True, check=True
    ).stdout.strip()
    source = _kubernetes_source(version) / "build" / "pause" / "linux" / "pause.c"
    work.mkdir(parents=True, exist_ok=True)
    binary = work / "pause"
    subprocess.run(
        ["gcc", "-Os", "-static", "-Wall", "-Werror", f"-DVERSION={version}", "-o", binary, source],
        check=True,
        capture_output=True,
    )
    ref = f"{registry}/{PAUSE_TAG}"
    ctr = subprocess.run(
        ["buildah", "from", "--quiet", "scratch"], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["buildah", "copy", "--quiet", ctr, str(binary), "/pause"], check=True,
                       capture_output=True)  # fmt: skip
        subprocess.run(["buildah", "config", "--entrypoint", '["/pause"]', "--user", "65535:65535",
                        ctr], check=True, capture_output=True)  # fmt: skip
        subprocess.run(["buildah", "commit", "--quiet", ctr, ref], check=True, capture_output=True)
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)
    try:
        subprocess.run(
            ["buildah", "push", "--quiet", "--tls-verify=false", ref, f"docker://{ref}"],
            check=True,
            capture_output=True,
        )
    finally:  # the registry has it; buildah's storage keeps no image per test run
        subprocess.run(["buildah", "rmi", ref], capture_output=True)
    return ref


# --- the node ----------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    dir: Path
    host_ip: str  # the host's address on the pods' bridge
    subnet: str
    bridge: str
    containerd_socket: Path
    cgroup: str  # the pods' cgroup root, in every hierarchy
    procs: list[Proc] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} (pid {p.popen.pid}, {p.log}):\n{p.tail()}" for p in self.procs
        )

    def ctr(self, *args: str) -> str:
        """containerd's own CLI on this node's socket, in the CRI's namespace."""
        return subprocess.run(
            ["ctr", "--address", str(self.containerd_socket), "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200.0.0/13 that no interface or route here uses."""
    used = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for _ in range(100):
        net = ipaddress.IPv4Network(f"10.{random.randint(200, 207)}.{random.randint(0, 255)}.0/24")
        if str(net) not in used and str(net[1]) not in used:
            return net
    raise NodeUnavailable("no free /24 in 10.200.0.0/13 for the pods' bridge")


def _start(dir: Path, procs: list[Proc], name: str, argv: list[str | Path]) -> Proc:
    log = dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        popen = subprocess.Popen(
            with_us([str(a) for a in argv]),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=dir,
            start_new_session=True,
        )
    proc = Proc(name, popen, log)
    procs.append(proc)
    return proc


def _containerd_config(dir: Path, registry: str, pause: str, cni: Path, cgroup: str) -> Path:
    certs = dir / "certs.d" / registry
    certs.mkdir(parents=True, exist_ok=True)
    (certs / "hosts.toml").write_text(
        f'server = "http://{registry}"\n\n[host."http://{registry}"]\n'
        '  capabilities = ["pull", "resolve"]\n'
    )
    config = dir / "containerd.toml"
    config.write_text(f"""\
version = 2
root = "{dir / "containerd" / "root"}"
state = "{dir / "containerd" / "state"}"
plugin_dir = ""
disabled_plugins = ["io.containerd.internal.v1.tracing", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs"]
oom_score = 0

[grpc]
  address = "{dir / "containerd.sock"}"

[ttrpc]
  address = ""

[debug]
  address = ""

[metrics]
  address = ""

[cgroup]
  path = "{cgroup}/containerd"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir / "containerd" / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{dir / "certs.d"}"
""")
    return config


@contextlib.contextmanager
def real_node(kube: Cluster, dir: Path, registry: str, name: str = "node-0") -> Iterator[Node]:
    """containerd and a kubelet registered with `kube` as node `name`; yields once the node is
    Ready. Stops both (and the pods' containers) and removes the bridge at the end."""
    bins = requirements()
    dir.mkdir(parents=True, exist_ok=True)
    pki = kube.dir / "pki"
    suffix = f"{random.getrandbits(16):04x}"
    bridge = f"vfk{suffix}"
    net = _free_subnet()
    host_ip = str(net[1])
    cgroup = f"/voicefleet-node-{suffix}"
    cni = dir / "cni"
    cni.mkdir(exist_ok=True)
    (cni / "10-pods.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": f"vf-{suffix}",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": bridge,
                        "isGateway": True,
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": str(net), "gateway": host_ip}]],
                            "dataDir": str(dir / "cni-ipam"),
                        },
                    },
                    {"type": "loopback"},
                ],
            },
            indent=1,
        )
    )
    pause = pause_image(registry, dir / "pause")
    # The bridge is made here, not by the CNI plugin at the first pod: the kubelet's node
    # address must be on an interface when it starts, and it may not be a loopback one.
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    config = _containerd_config(dir, registry, pause, cni, cgroup)
    socket = dir / "containerd.sock"
    node = Node(name, dir, host_ip, str(net), bridge, socket, cgroup)
    try:
        subprocess.run(["ip", "addr", "add", f"{host_ip}/{net.prefixlen}", "dev", bridge],
                       check=True)  # fmt: skip
        subprocess.run(["ip", "link", "set", bridge, "up"], check=True)
        _start(dir, node.procs, "containerd", [bins["containerd"], "--config", config])
        deadline = time.monotonic() + 30
        while not socket.exists():
            if node.procs[0].popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start:\n{node.logs()}")
            time.sleep(0.1)

        # The kubelet: its client certificate says who it is (the Node authorizer's user),
        # its serving certificate is for 127.0.0.1.
        key, crt = kube.authority.issue(pki, f"kubelet-{name}", f"system:node:{name}",
                                        orgs=["system:nodes"])  # fmt: skip
        skey, scrt = kube.authority.issue(
            pki, f"kubelet-{name}-serving", name, server_names=[name], server_ips=[host_ip]
        )
        kubeconfig = _kubeconfig(
            dir / "kubelet.kubeconfig", kube.server, kube.ca, crt, key, f"system:node:{name}"
        )
        port, healthz = free_ports(2)
        kubelet_config = dir / "kubelet.yaml"
        kubelet_config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "failCgroupV1": False,
                    "cgroupDriver": "cgroupfs",
                    "cgroupRoot": cgroup,
                    "failSwapOn": False,
                    "oomScoreAdj": 0,
                    "address": "127.0.0.1",
                    "port": port,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": healthz,
                    "tlsCertFile": str(scrt),
                    "tlsPrivateKeyFile": str(skey),
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": False},
                        "x509": {"clientCAFile": str(kube.ca)},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "containerRuntimeEndpoint": f"unix://{socket}",
                    "imageServiceEndpoint": f"unix://{socket}",
                    "staticPodPath": "",
                    "podLogsDir": str(dir / "pod-logs"),
                    "makeIPTablesUtilChains": False,
                    "localStorageCapacityIsolation": False,
                    "evictionHard": {
                        "memory.available": "1Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                    },
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "registerNode": True,
                    "resolvConf": "",
                    "syncFrequency": "5s",
                    "nodeStatusUpdateFrequency": "5s",
                    "enableServer": True,
                    "serializeImagePulls": False,
                    "volumeStatsAggPeriod": "0s",
                    "protectKernelDefaults": False,
                    "enableControllerAttachDetach": True,
                    "memorySwap": {},
                }
            )
        )
        _start(dir, node.procs, "kubelet", [
            bins["kubelet"], f"--config={kubelet_config}", f"--kubeconfig={kubeconfig}",
            f"--root-dir={dir / 'kubelet'}", f"--hostname-override={name}",
            f"--node-ip={host_ip}", f"--cert-dir={dir / 'kubelet-certs'}", "--v=2",
        ])  # fmt: skip

        def ready() -> bool:
            with kube.http() as client:
                r = client.get(f"/api/v1/nodes/{name}")
                if r.status_code != 200:
                    return False
                conditions = r.json().get("status", {}).get("conditions", [])
                return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        deadline = time.monotonic() + 120
        while True:
            for p in node.procs:
                if p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} exited ({p.popen.returncode}):\n{p.tail(60)}")
            with contextlib.suppress(httpx.HTTPError):
                if ready():
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {name} not Ready after 120 s\n{node.logs()}")
            time.sleep(0.5)
        kube.nodes.append(name)
        yield node
    finally:
        _stop_node(node)


def _stop_node(node: Node) -> None:
    """The kubelet first, then every container shim started by this node's containerd (found by
    its socket in their command lines: by pid), then containerd; then the bridge and mounts."""
    for p in reversed(node.procs):
        if p.name == "containerd":
            _stop_shims(node)
        p.stop()
    subprocess.run(["ip", "link", "delete", node.bridge], capture_output=True)
    # The kubelet links each container's log into /var/log/containers (a fixed path): the
    # links to this node's logs go with it.
    with contextlib.suppress(OSError):
        for link in Path(LEGACY_LOGS).iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(f"{node.dir}/"):
                    link.unlink()
    mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True)
    for target in sorted(mounts.stdout.split(), reverse=True):
        if target.startswith(f"{node.dir}/"):
            subprocess.run(["umount", "-l", target], capture_output=True)


def _cgroup_dirs(node: Node) -> list[Path]:
    """This node's cgroups in every hierarchy, the deepest first."""
    found: list[Path] = []
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / node.cgroup.lstrip("/")
        if top.is_dir():
            found += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _stop_shims(node: Node) -> None:
    """SIGKILL to every process in the node's cgroups (the containers), then to the shims this
    node's containerd started (its socket is in their command lines), then the cgroups go."""
    for d in _cgroup_dirs(node):
        with contextlib.suppress(OSError):
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            if "containerd-shim" in cmdline and str(node.containerd_socket) in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)
    deadline = time.monotonic() + 10
    for d in _cgroup_dirs(node):
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # still has processes that are dying
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)


def main() -> None:
    """scripts/kube-node: the control plane, a registry and one real node, until Ctrl-C."""
    import argparse
    import tempfile

    from tests import images
    from tests.kube import kube_cluster

    parser = argparse.ArgumentParser(
        prog="scripts/kube-node",
        description="A control plane (tests/kube.py), Debian's docker-registry and one real "
        "node (a kubelet with containerd and runc) on this machine, until Ctrl-C or SIGTERM; "
        "then everything is stopped and the node's bridge and cgroups removed.",
    )
    parser.add_argument("dir", nargs="?", type=Path, help="where it all lives (default: a new "
                        "directory in /tmp; kept afterwards, for its logs)")  # fmt: skip
    args = parser.parse_args()
    dir = args.dir or Path(tempfile.mkdtemp(prefix="vf-node-"))
    try:
        requirements()
    except NodeUnavailable as e:
        parser.exit(3, f"scripts/kube-node: {e}\n")

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        with (
            kube_cluster(dir / "kube", nodes=0) as kube,
            images.registry(dir / "registry") as registry,
            real_node(kube, dir / "node", registry) as node,
        ):
            print(
                f"node {node.name} Ready (pods: {node.subnet}; the host: {node.host_ip})\n"
                f"  KUBECONFIG={kube.kubeconfig}    (the admin's)\n"
                f"  registry:  {registry}  (plain HTTP: buildah push --tls-verify=false IMAGE "
                f"docker://{registry}/NAME:TAG)\n"
                f"  logs:      {kube.dir / 'logs'}, {node.dir / 'logs'}\n"
                "Ctrl-C stops it all.",
                flush=True,
            )
            signal.pause()


if __name__ == "__main__":
    main()
