"""Flag flip latency: from a `PUT` of a flag to the Python and the Node.js SDK seeing it.

    (cd sdk/node && npm ci && npm run build)      # the Node SDK, built in the work tree
    python benchmarks/flags/flip.py [--flips 50]

One `vf server --dev`, one agent, a Python `FlagsClient` in this process and a Node.js process on
sdk/node/dist, both streaming the agent's flags. Each flip: the time before the `PUT` is sent,
then each client's first sight of the new value (the Python client's `version` change, waited
on; the Node process's line on its `change` event, read through a pipe by a thread here), all on
this process's clock. Figures: median and 90th percentile of each, and of the `PUT` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
from voicefleet.protocol import tokens  # noqa: E402
from voicefleet.sdk import FlagsClient  # noqa: E402

KEY, SECRET = "devkey", "secret"
NODE_CLIENT = """
import { FlagsClient } from %s;
const client = new FlagsClient({ cachePath: process.env.CACHE }).start();
client.on('change', () =>
  process.stdout.write(JSON.stringify({ v: client.getString('mode', '') }) + '\\n'));
process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--flips", type=int, default=50)
    args = parser.parse_args()
    dist = ROOT / "sdk" / "node" / "dist" / "index.js"
    if not dist.exists():
        raise SystemExit("build the Node SDK first: (cd sdk/node && npm ci && npm run build)")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        ready = data / "ready.json"
        server = subprocess.Popen(
            [sys.executable, "-m", "voicefleet", "server", "--dev", "--port", "0",
             "--data-dir", str(data), "--ready-file", str(ready), "--log-level", "warning"],
            stdout=open(data / "server.log", "wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        node = None
        py = None
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server did not start: {(data / 'server.log').read_text()}")
                time.sleep(0.05)
            url = json.loads(ready.read_text())["url"]
            http = httpx.Client(
                base_url=url,
                headers={"Authorization": f"Bearer {tokens.mint_admin(KEY, SECRET)}"},
                timeout=30,
            )
            agent = http.post("/api/v1/agents", json={"name": "bench-flags"}).json()["id"]

            def put(value: str) -> None:
                body = {"type": "string", "value": value}
                http.put(f"/api/v1/agents/{agent}/flags/mode", json=body).raise_for_status()

            put("start")
            py = FlagsClient(url, agent, KEY, SECRET, cache_path=Path(tmp) / "py.json").start()
            script = Path(tmp) / "client.mjs"
            script.write_text(NODE_CLIENT % json.dumps(dist.as_uri()))
            env = {**os.environ, "VOICEFLEET_URL": url, "VOICEFLEET_AGENT_ID": agent,
                   "LIVEKIT_API_KEY": KEY, "LIVEKIT_API_SECRET": SECRET,
                   "CACHE": str(Path(tmp) / "node.json")}  # fmt: skip
            node = subprocess.Popen(
                ["node", str(script)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            lines: queue.Queue[tuple[float, str]] = queue.Queue()

            def read() -> None:
                assert node is not None and node.stdout is not None
                for line in node.stdout:
                    lines.put((time.monotonic(), json.loads(line)["v"]))

            threading.Thread(target=read, daemon=True).start()
            assert py.wait_ready(10), "the Python client did not connect"
            while lines.get(timeout=10)[1] != "start":
                pass

            puts, py_ms, node_ms = [], [], []
            for n in range(args.flips):
                value = f"v{n}"
                version = py.version
                t0 = time.monotonic()
                put(value)
                puts.append((time.monotonic() - t0) * 1e3)
                assert py.wait_version(version, 10), "the Python client missed a flip"
                py_ms.append((time.monotonic() - t0) * 1e3)
                while True:
                    at, seen = lines.get(timeout=10)
                    if seen == value:
                        node_ms.append((at - t0) * 1e3)
                        break
                time.sleep(0.05)
        finally:
            if py is not None:
                py.close()
            if node is not None:
                node.kill()
                node.wait()
            server.send_signal(signal.SIGTERM)
            server.wait(30)

    def fig(ms: list[float]) -> str:
        p90 = statistics.quantiles(ms, n=10)[-1]
        return f"median {statistics.median(ms):6.1f} ms, p90 {p90:6.1f} ms"

    print(f"{args.flips} flips, one server, one agent")
    print(f"  PUT answered      {fig(puts)}")
    print(f"  Python SDK sees   {fig(py_ms)}")
    print(f"  Node.js SDK sees  {fig(node_ms)}")


if __name__ == "__main__":
    main()
