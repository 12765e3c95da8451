"""voicefleet as one LiveKit worker, for one pool of its own workers.

One connection per pool key (agent name, namespace, job type) to `<livekit url>/agent`, as a
livekit-agents worker makes it: register with the pool's name, namespace, type and permissions;
report the pool's aggregate load and status; turn each availability request into a local job
(`RelayedJob`), its assignment into the local worker's, a termination into the local job's end.
When the connection drops, or LiveKit asks it to go away, it comes back (with backoff after a
failure), registers again and reports the jobs that still run here (`migrate_job`, as
livekit-agents does); no local call is touched meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from google.protobuf.message import DecodeError
from livekit.protocol import agent, models
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidState, WebSocketException

from voicefleet import __version__
from voicefleet.config import GatewaySettings
from voicefleet.dispatch.jobs import Job
from voicefleet.dispatch.registry import PoolKey, PoolLoad
from voicefleet.dispatch.service import DispatchService
from voicefleet.errors import NoCapacity
from voicefleet.gateway.relay import RelayedJob
from voicefleet.gateway.target import LiveKitTarget, backoff, why_not

log = logging.getLogger("voicefleet.gateway")

MAX_FRAME = 1 << 20
# The load reported for a pool that has no free worker but can start one: below 1, so that
# LiveKit still offers it jobs (it picks workers weighted by 1 - load, and never one at 1), and
# high, so that another voicefleet server with a worker free now is preferred to a cold start.
COLD_START_LOAD = 0.9

CanStart = Callable[[PoolKey], bool]


class Outbox(Protocol):
    """Where frames to LiveKit go: `Frames` on a connection (a test may put a queue)."""

    def put_nowait(self, item: bytes, /) -> None: ...


class Frames:
    """The frames to LiveKit on one connection, each written to it as it is put, in the
    caller's turn of the event loop.

    As `ws.send()` writes them, less its wait for the socket's buffer to drain: the frames
    here are small and few (an offer's answer, a job's or the pool's status), and a queue and
    writer task in between would cost a loop turn on every offer's answer. Once the
    connection is closing it takes no more frames: its end is seen by `_serve`'s reader."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    def put_nowait(self, item: bytes, /) -> None:
        try:
            self._ws.protocol.send_binary(item)
        except InvalidState:
            log.debug("LiveKit's connection is closing; message dropped")
            return
        self._ws.send_data()


class RegisterFailed(Exception):
    """LiveKit did not answer the register message as a LiveKit server does."""


def upstream_status(pool: PoolLoad, can_start: bool) -> tuple[agent.WorkerStatus, float]:
    """What voicefleet tells LiveKit of one pool, as one worker's status and load.

    Full only when no worker here can take a job now and none can be started: a pool that can
    start an instance (the autoscaler may scale it up, or from zero) takes offers, which queue
    here and wake the autoscaler. Reporting it full would mean LiveKit offers nothing, so nothing
    queues, and an agent scaled to zero would never be started again."""
    if pool.available:
        return agent.WorkerStatus.WS_AVAILABLE, pool.load
    if can_start:
        return agent.WorkerStatus.WS_AVAILABLE, COLD_START_LOAD
    return agent.WorkerStatus.WS_FULL, 1.0


def never(key: PoolKey) -> bool:
    """The default answer to "can an instance of this pool be started?"."""
    return False


class Upstream:
    def __init__(
        self,
        key: PoolKey,
        permissions: models.ParticipantPermission,
        target: LiveKitTarget,
        service: DispatchService,
        settings: GatewaySettings,
        can_start: CanStart = never,
    ) -> None:
        self.key = key
        self.permissions = permissions
        self._target = target
        self._service = service
        self._settings = settings
        self._can_start = can_start
        self.worker_id = ""  # LiveKit's id for the current registration; "" while not registered
        self.registrations = 0
        # Jobs LiveKit offered that have not ended here, by job id.
        self._links: dict[str, RelayedJob] = {}
        self._outbox: Outbox | None = None  # the current connection's (Frames)
        self._pool_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # LiveKit asked this connection to go away (its reason): it takes no new offer, answers
        # those in flight, then closes; the next connection is made at once.
        self._going_away = ""
        self._offer_moved = asyncio.Event()  # an offer was answered, assigned or ended

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"upstream {self.key.agent_name}")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- what happens here --------------------------------------------------------------------

    def pool_changed(self) -> None:
        self._pool_changed.set()

    def job_changed(self, job: Job) -> None:
        link = self._links.get(job.id)
        if link is None or job.upstream is not link:
            return
        link.changed(job)
        if job.ended:
            del self._links[job.id]
        self._offer_moved.set()

    # -- the connection -----------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                async with connect(
                    self._target.agent_url,
                    additional_headers=self._target.headers(),
                    open_timeout=self._settings.connect_timeout,
                    max_size=MAX_FRAME,
                    proxy=None,
                ) as ws:
                    await self._register(ws)
                    failures = 0
                    reason = await self._serve(ws)
                    if self._going_away:
                        # Not a failure: LiveKit asked for a new connection (e.g. it drains).
                        self._going_away = ""
                        log.info(
                            "LiveKit asked voicefleet to reconnect: registering again",
                            extra={"agent_name": self.key.agent_name, "reason": reason},
                        )
                        continue
            except (OSError, TimeoutError, WebSocketException, RegisterFailed) as e:
                reason = why_not(self._target, e)
            except Exception as e:  # a bug: said with its traceback, and the link retried
                log.exception("gateway link failed", extra={"agent_name": self.key.agent_name})
                reason = repr(e)
            finally:
                try:
                    self._disconnected()
                except Exception:  # a bug: said, and the link still comes back
                    log.exception("cleaning up after LiveKit's connection failed")
            delay = backoff(failures, self._settings.retry_first, self._settings.retry_max)
            failures += 1
            log.warning(
                "not registered with LiveKit as agent %r: %s; retrying in %gs",
                self.key.agent_name,
                reason,
                delay,
                extra={"agent_name": self.key.agent_name, "attempt": failures},
            )
            await asyncio.sleep(delay)

    async def _register(self, ws: ClientConnection) -> None:
        register = agent.RegisterWorkerRequest(
            type=self.key.job_type,  # type: ignore[arg-type]
            agent_name=self.key.agent_name,
            namespace=self.key.namespace,
            version=f"voicefleet-{__version__}",
        )
        register.allowed_permissions.CopyFrom(self.permissions)
        await ws.send(agent.WorkerMessage(register=register).SerializeToString())
        first = await asyncio.wait_for(ws.recv(), self._settings.connect_timeout)
        msg = _parse(first)
        if msg is None or msg.WhichOneof("message") != "register":
            raise RegisterFailed("LiveKit's first message was not the register answer")
        self.worker_id = msg.register.worker_id
        self.registrations += 1
        log.info(
            "registered with LiveKit as a worker",
            extra={
                "agent_name": self.key.agent_name,
                "namespace": self.key.namespace,
                "job_type": agent.JobType.Name(self.key.job_type),
                "upstream_worker": self.worker_id,
                "url": self._target.url,
                "registration": self.registrations,
            },
        )

    async def _serve(self, ws: ClientConnection) -> str:
        """Relay until the connection ends; return why it ended."""
        self._outbox = Frames(ws)
        self._going_away = ""  # a new connection: LiveKit has asked nothing of it yet
        # What a reconnecting livekit-agents worker says first: the jobs it still runs.
        running = [i for i, link in self._links.items() if link.grant is not None]
        if running:
            self._send(agent.WorkerMessage(migrate_job=agent.MigrateJobRequest(job_ids=running)))
            log.info("reported running jobs to LiveKit", extra={"jobs": running})
        tasks = [asyncio.create_task(self._report())]
        try:
            async for data in ws:
                if self._handle(data):
                    tasks.append(asyncio.create_task(self._leave(ws)))
            if self._going_away:
                return f"LiveKit asked voicefleet to go away ({self._going_away})"
            return f"LiveKit closed the connection ({ws.close_code} {ws.close_reason})".strip()
        except ConnectionClosed as e:
            return f"the connection to LiveKit dropped ({e})"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _leave(self, ws: ClientConnection) -> None:
        """Close the connection LiveKit asked to go away, once the offers in flight on it are
        answered and their assignments in (bounded: LiveKit gives up on them sooner)."""
        s = self._settings
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(s.answer_within + s.assignment_within):
                while any(link.in_flight for link in self._links.values()):
                    self._offer_moved.clear()
                    await self._offer_moved.wait()
        await ws.close()

    async def _report(self) -> None:
        """The pool's status, as one worker's: on each change that matters, and periodically."""
        last: tuple[agent.WorkerStatus, int] | None = None
        sent_at = 0.0
        while True:
            pool = self._service.pool_load(self.key)
            status, load = upstream_status(pool, self._can_start(self.key))
            now = (status, pool.jobs)
            if now != last or time.monotonic() - sent_at >= self._settings.status_interval:
                self._send(
                    agent.WorkerMessage(
                        update_worker=agent.UpdateWorkerStatus(
                            status=status, load=load, job_count=pool.jobs
                        )
                    )
                )
                last, sent_at = now, time.monotonic()
            self._pool_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pool_changed.wait(), self._settings.status_interval)

    def _send(self, msg: agent.WorkerMessage) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(msg.SerializeToString())
        else:
            log.debug(
                "not connected to LiveKit; message dropped",
                extra={"message_type": msg.WhichOneof("message")},
            )

    def _disconnected(self) -> None:
        """The connection is gone: what waited on it gets its answer; running jobs go on."""
        self._outbox = None
        self.worker_id = ""
        for link in list(self._links.values()):
            if not link.answered and link.job is not None:
                link.answered = True  # nobody left to answer
                self._service.end_job(
                    link.job, "the connection to LiveKit dropped before a worker here took the job"
                )
            link.lost()

    # -- what LiveKit says --------------------------------------------------------------------

    def _handle(self, data: str | bytes) -> bool:
        """Act on one frame from LiveKit; True when it asks this connection to go away."""
        msg = _parse(data)
        if msg is None:
            return False
        which = msg.WhichOneof("message")
        if which == "availability":
            self._offered(msg.availability.job)
        elif which == "assignment":
            link = self._links.get(msg.assignment.job.id)
            if link is not None:
                link.assigned(msg.assignment)
                self._offer_moved.set()
            else:
                log.info(
                    "assignment for a job not offered here", extra={"job": msg.assignment.job.id}
                )
        elif which == "termination":
            link = self._links.get(msg.termination.job_id)
            if link is not None and link.job is not None:
                link.ended_upstream = True
                self._service.end_job(link.job, "terminated by LiveKit")
        elif which == "go_away":
            # LiveKit Cloud's way to move its workers elsewhere (the open-source server never
            # sends it): this connection takes no new job; the calls running here go on and
            # are reported on the next connection.
            if self._going_away:
                return False
            self._going_away = msg.go_away.reason or "no reason given"
            log.info(
                "LiveKit asked voicefleet to go away",
                extra={"agent_name": self.key.agent_name, "reason": self._going_away},
            )
            return True
        else:
            log.debug("ignored LiveKit message", extra={"message_type": which})
        return False

    def _offered(self, offer: agent.Job) -> None:
        """An availability request: a local job now; the answer when a worker here takes it
        (RelayedJob.accepted), or `not available` at the deadline. Never waited on here, so
        LiveKit's offers are never held up behind one another."""
        if offer.id in self._links:
            log.info("job offered twice; the first offer stands", extra={"job": offer.id})
            return
        if self._going_away:
            self._send(
                agent.WorkerMessage(
                    availability=agent.AvailabilityResponse(job_id=offer.id, available=False)
                )
            )
            return
        link = RelayedJob(
            offer, self._send, self._target.room_url, self._settings.assignment_within
        )
        self._links[offer.id] = link
        try:
            link.job = self._service.relay_job(link)
        except NoCapacity as e:
            log.info("job from LiveKit refused", extra={"job": offer.id, "reason": str(e)})
            del self._links[offer.id]
            link.refuse()
            return
        asyncio.get_running_loop().call_later(self._settings.answer_within, self._deadline, link)

    def _deadline(self, link: RelayedJob) -> None:
        if link.answered or link.job is None:
            return
        link.refuse()
        self._service.end_job(
            link.job,
            f"no worker here took the job within {self._settings.answer_within:g}s "
            "(LiveKit's offer expires)",
        )


def _parse(data: str | bytes) -> agent.ServerMessage | None:
    if isinstance(data, str):
        log.warning("LiveKit sent a text frame; ignored")
        return None
    msg = agent.ServerMessage()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        log.warning("LiveKit sent a frame that is not a ServerMessage; ignored")
        return None
    return msg
