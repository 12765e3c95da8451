"""Run an unmodified LiveKit agent with a health port of voicefleet's choosing.

    <env python> launch.py --port N agent.py start

`python agent.py start` binds its health server to :8081, so a second instance on the same
machine fails. livekit-agents has no flag or variable for the port, only `port=` in the agent's
own code. This launcher leaves the agent's code alone: it gives AgentServer (livekit-agents
1.8.x) the port N when the agent did not choose one, then runs agent.py as `__main__`.
Likewise the drain timeout (livekit-agents' default: one hour, then it cuts its sessions)
becomes the agent's grace period (VOICEFLEET_GRACE_PERIOD) when the agent did not choose one.

It runs under the *version's* environment, where voicefleet is not installed: so it is a
script run by path, and uses only the standard library and livekit-agents.
"""

import importlib.util
import os
import sys


def _give_port(port: int, grace: int | None) -> None:
    from livekit.agents import worker

    original = worker.AgentServer.__init__

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **kwargs)
        # A port the agent set itself is an int; the default is a ServerEnvOption.
        if isinstance(self._port, worker.ServerEnvOption):
            self._port = port
        if grace is not None and self._drain_timeout == worker.DRAIN_TIMEOUT:
            self._drain_timeout = grace

    worker.AgentServer.__init__ = __init__  # type: ignore[method-assign]


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[1] != "--port":
        sys.exit("usage: launch.py --port N agent.py [args...]")
    port, entry, args = int(sys.argv[2]), os.path.abspath(sys.argv[3]), sys.argv[4:]
    raw_grace = os.environ.get("VOICEFLEET_GRACE_PERIOD", "")
    grace = int(raw_grace) if raw_grace.isdigit() else None
    _give_port(port, grace)
    sys.argv = [entry, *args]
    sys.path.insert(0, os.path.dirname(entry))
    spec = importlib.util.spec_from_file_location("__main__", entry)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot load {entry}")
    module = importlib.util.module_from_spec(spec)
    # As for `python agent.py`: no __spec__, so multiprocessing's job processes re-import the
    # agent from its file (as __mp_main__) and find the functions the worker pickles.
    module.__spec__ = None
    sys.modules["__main__"] = module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    main()
