"""One job a LiveKit server offered voicefleet: the link between its two sides.

LiveKit sees voicefleet as one worker; the job runs on a worker of voicefleet's own. This link
is the scheduler's `Upstream` for the job (see dispatch/jobs.py): the scheduler places the job
as any other, and when a local worker accepts, the link answers LiveKit's availability request
with that worker's answer and hands back LiveKit's assignment (its url and room token). After
that it reports the job's states upstream as the local worker reports them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from livekit.protocol import agent

from voicefleet.dispatch.jobs import Job, JobState, RoomGrant

log = logging.getLogger("voicefleet.gateway")

_UPSTREAM_STATUS = {
    JobState.RUNNING: agent.JobStatus.JS_RUNNING,
    JobState.SUCCEEDED: agent.JobStatus.JS_SUCCESS,
    JobState.FAILED: agent.JobStatus.JS_FAILED,
    # LiveKit's server knows only success and failure as ends: a job ended here for another
    # reason (a worker cancelled it) did not run to its end.
    JobState.TERMINATED: agent.JobStatus.JS_FAILED,
}

Send = Callable[[agent.WorkerMessage], None]


class RelayedJob:
    """The scheduler's `Upstream` for one job LiveKit offered; `send` reaches LiveKit."""

    def __init__(self, offer: agent.Job, send: Send, room_url: str, assignment_within: float):
        self._offer = offer
        self._send = send
        self._room_url = room_url
        self._assignment_within = assignment_within
        self.job: Job | None = None  # the local job, once placed
        # LiveKit's availability request got its answer (either way): it is answered once.
        self.answered = False
        # LiveKit's url and token, once assigned: kept for the job's life, so that a job
        # placed again here (its worker did not start it) joins with the same grant.
        self.grant: RoomGrant | None = None
        # LiveKit ended the job, or forgot it: nothing more to report upstream.
        self.ended_upstream = False
        self._assignment: asyncio.Future[agent.JobAssignment | None] = (
            asyncio.get_running_loop().create_future()
        )

    @property
    def id(self) -> str:
        return self._offer.id

    @property
    def offer(self) -> agent.Job:
        return self._offer

    @property
    def in_flight(self) -> bool:
        """LiveKit's offer still waits for an answer or, accepted, for its assignment."""
        if not self.answered:
            return True
        return self.grant is None and self.job is not None and not self.job.ended

    # -- the scheduler's hook -----------------------------------------------------------------

    async def accepted(self, job: Job, answer: agent.AvailabilityResponse) -> RoomGrant | None:
        if self.grant is not None:
            return self.grant
        if self.answered:
            return None  # refused upstream already (its deadline passed)
        self.answered = True
        self._send(
            agent.WorkerMessage(
                availability=agent.AvailabilityResponse(
                    job_id=self.id,
                    available=True,
                    supports_resume=answer.supports_resume,
                    participant_identity=answer.participant_identity,
                    participant_name=answer.participant_name,
                    participant_metadata=answer.participant_metadata,
                    participant_attributes=dict(answer.participant_attributes),
                )
            )
        )
        try:
            # Awaited directly, not through wait_for and shield (a loop turn each before the
            # assignment goes on to the worker). At the timeout the future is cancelled: a
            # late assignment is ignored (`assigned`), as it was.
            async with asyncio.timeout(self._assignment_within):
                assignment = await self._assignment
        except TimeoutError:
            log.warning("LiveKit accepted nothing: no assignment came", extra={"job": self.id})
            return None
        if assignment is None:
            return None
        # LiveKit's OSS server sends no url (its workers join where they connected): the
        # rooms are on the LiveKit server voicefleet registered with.
        self.grant = RoomGrant(assignment.url or self._room_url, assignment.token)
        return self.grant

    # -- what LiveKit says --------------------------------------------------------------------

    def assigned(self, assignment: agent.JobAssignment) -> None:
        if not self._assignment.done():
            self._assignment.set_result(assignment)

    def lost(self) -> None:
        """The connection to LiveKit is gone: no assignment will come on it."""
        if not self._assignment.done():
            self._assignment.set_result(None)

    # -- what happens here --------------------------------------------------------------------

    def refuse(self, terminate: bool = False) -> None:
        """Answer LiveKit's availability request, once, if not yet answered: not available
        (LiveKit tries its next worker), or with `terminate` the job is over (it tries none)."""
        if self.answered:
            return
        self.answered = True
        self._send(
            agent.WorkerMessage(
                availability=agent.AvailabilityResponse(
                    job_id=self.id, available=False, terminate=terminate
                )
            )
        )

    def changed(self, job: Job) -> None:
        """The local job changed state: tell LiveKit what it would hear from a worker."""
        if job.ended and self.grant is None:
            # Ended before any worker here took it. Terminated (a worker answered the offer
            # with `terminate`, as livekit-agents' `reject()` does): over for LiveKit too, which
            # then records it as done and offers it to no other worker. Failed (no worker
            # took it in time): not available, so that LiveKit may try another worker.
            self.refuse(terminate=job.state == JobState.TERMINATED)
            return
        status = _UPSTREAM_STATUS.get(job.state)
        if status is None or self.grant is None or self.ended_upstream:
            return
        self._send(
            agent.WorkerMessage(
                update_job=agent.UpdateJobStatus(job_id=self.id, status=status, error=job.error)
            )
        )
