"""Run an agent script (`$AGENT_SCRIPT start`) with its health server on a free port.

`python agent.py start` binds livekit-agents' health server to :8081 unless the agent's own code
sets `port=`, so two workers of one unmodified agent cannot run side by side on one host (here:
one network namespace). This gives the worker port 0 (any free port) when the agent chose none,
then runs the script as `__main__`, unchanged otherwise:

    AGENT_SCRIPT=examples/voice_agent/agent.py python benchmarks/livekit/any_port.py start
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any


def main() -> None:
    from livekit.agents import worker

    original = worker.AgentServer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if isinstance(self._port, worker.ServerEnvOption):  # the default, not the agent's choice
            self._port = 0

    worker.AgentServer.__init__ = __init__  # type: ignore[method-assign]
    entry = os.path.abspath(os.environ["AGENT_SCRIPT"])
    sys.argv = [entry, *sys.argv[1:]]
    sys.path.insert(0, os.path.dirname(entry))
    spec = importlib.util.spec_from_file_location("__main__", entry)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot load {entry}")
    module = importlib.util.module_from_spec(spec)
    module.__spec__ = None  # job processes (forkserver) import it again from its path
    sys.modules["__main__"] = module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    main()
