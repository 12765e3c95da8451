"""A hand-written protocol peer, for what a real livekit-agents worker will not do on demand:
never answer an offer, send garbage, go silent. Speaks the same protobuf frames over aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

import aiohttp
from livekit.protocol import agent

from tests.support import DEV_KEY, DEV_SECRET
from voicefleet.protocol import tokens

Answer = Literal["accept", "refuse", "ignore"]


def worker_jwt(key: str = DEV_KEY, secret: str = DEV_SECRET, **extra: object) -> str:
    return tokens.mint(key, secret, video={"agent": True}, **extra)


class Peer:
    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session, self.ws = session, ws
        self.worker_id = ""
        self.answer: Answer = "accept"
        self.start_jobs = True  # report JS_RUNNING on assignment (False: drop it, say nothing)
        self.end_jobs = True  # report JS_SUCCESS right after JS_RUNNING
        self.offers: list[str] = []
        self.assignments: list[agent.JobAssignment] = []
        self.terminations: list[str] = []
        self.pongs: list[agent.WorkerPong] = []
        self.closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        ws_url: str,
        agent_name: str,
        *,
        token: str | None = None,
        params: dict[str, str] | None = None,
        deployment: str = "",
        register: bool = True,
        reports_jobs: bool = True,
    ) -> Peer:
        """A registered peer. `reports_jobs`: it has reported a job's status before, as a
        livekit-agents (Python) worker does from its first job on; the start timeout applies
        only to such workers (Node's @livekit/agents 1.9 reports none: False)."""
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(
            f"{ws_url}/agent",
            headers={"Authorization": f"Bearer {token or worker_jwt()}"},
            params=params or {},
        )
        peer = cls(session, ws)
        if register:
            await peer.send(
                agent.WorkerMessage(
                    register=agent.RegisterWorkerRequest(
                        type=agent.JobType.JT_ROOM, agent_name=agent_name, version="peer",
                        deployment=deployment,
                    )
                )
            )  # fmt: skip
            first = agent.ServerMessage.FromString(await ws.receive_bytes(timeout=10))
            peer.worker_id = first.register.worker_id
            await peer.status()
            if reports_jobs:
                done = agent.UpdateJobStatus(job_id="AJ_before", status=agent.JobStatus.JS_SUCCESS)
                await peer.send(agent.WorkerMessage(update_job=done))
        peer._reader = asyncio.create_task(peer._read())
        return peer

    async def send(self, msg: agent.WorkerMessage) -> None:
        await self.ws.send_bytes(msg.SerializeToString())

    async def status(self, full: bool = False, load: float = 0.0, jobs: int = 0) -> None:
        status = agent.WorkerStatus.WS_FULL if full else agent.WorkerStatus.WS_AVAILABLE
        await self.send(
            agent.WorkerMessage(
                update_worker=agent.UpdateWorkerStatus(status=status, load=load, job_count=jobs)
            )
        )

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if frame.type != aiohttp.WSMsgType.BINARY:
                    break
                msg = agent.ServerMessage.FromString(frame.data)
                which = msg.WhichOneof("message")
                if which == "availability":
                    await self._offered(msg.availability.job)
                elif which == "assignment":
                    self.assignments.append(msg.assignment)
                    if not self.start_jobs:
                        continue
                    await self.update(msg.assignment.job.id, agent.JobStatus.JS_RUNNING)
                    if self.end_jobs:
                        await self.update(msg.assignment.job.id, agent.JobStatus.JS_SUCCESS)
                elif which == "termination":
                    self.terminations.append(msg.termination.job_id)
                elif which == "pong":
                    self.pongs.append(msg.pong)
        finally:
            self.closed.set()

    async def _offered(self, job: agent.Job) -> None:
        self.offers.append(job.id)
        if self.answer == "ignore":
            return
        await self.send(
            agent.WorkerMessage(
                availability=agent.AvailabilityResponse(
                    job_id=job.id,
                    available=self.answer == "accept",
                    participant_identity=f"peer-{job.id}",
                )
            )
        )

    async def update(self, job_id: str, status: agent.JobStatus.ValueType) -> None:
        await self.send(
            agent.WorkerMessage(update_job=agent.UpdateJobStatus(job_id=job_id, status=status))
        )

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self.ws.close()
        await self.session.close()
