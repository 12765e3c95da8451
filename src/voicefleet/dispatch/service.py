"""The dispatch server's parts wired together, and the operations its APIs expose."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from voicefleet.config import DispatchSettings, Project
from voicefleet.dispatch.jobs import ENDED, Dispatch, Job, JobBook, JobState, new_id
from voicefleet.dispatch.registry import Registry
from voicefleet.dispatch.routing import RoutingTable
from voicefleet.dispatch.scheduler import Scheduler
from voicefleet.dispatch.stats import VersionStats
from voicefleet.errors import InvalidRequest, NotFound
from voicefleet.metrics import Metrics
from voicefleet.protocol import tokens

log = logging.getLogger("voicefleet.dispatch")


class DispatchService:
    def __init__(self, project: Project, settings: DispatchSettings, metrics: Metrics) -> None:
        self.project = project
        self.settings = settings
        self.metrics = metrics
        self.registry = Registry()
        self.book = JobBook(settings.finished_jobs_in_memory)
        self.routing = RoutingTable()
        self.scheduler = Scheduler(
            self.registry, self.book, project, settings, metrics, self.routing
        )
        self.book.job_listeners.append(self._count_job)
        self.stats = VersionStats()
        self.book.job_listeners.append(self.stats.job_changed)
        # Set when this server stops: workers then lose their connection because of us, not
        # because they died, so their jobs stay running in the store for the next start.
        self.closing = False
        # Jobs that were running when the server last stopped, by adoption deadline.
        self._orphans: dict[str, float] = {}
        metrics.gauge(
            "voicefleet_workers",
            "Connected workers by status.",
            "status",
            lambda: {str(k): v for k, v in self.registry.counts().items()},
        )
        metrics.gauge(
            "voicefleet_jobs",
            "Jobs held in memory by state (live jobs and recently ended ones).",
            "state",
            lambda: {str(k): v for k, v in self.book.counts().items()},
        )
        metrics.gauge(
            "voicefleet_queued_jobs",
            "Jobs waiting for an available worker, by agent name; names no worker registered "
            'with and no routing entry has are summed under agent_name="(unknown)".',
            "agent_name",
            self.scheduler.queued_by_label,
        )

    def secret_for(self, api_key: str) -> str | None:
        """The secret of the project's key, or of an instance key derived from it."""
        if api_key == self.project.api_key:
            return self.project.api_secret
        if tokens.instance_identity(api_key) is not None:
            return tokens.instance_secret(self.project.api_secret, api_key)
        return None

    def _count_job(self, job: Job, previous: JobState | None) -> None:
        self.metrics.jobs_total.labels(str(job.state)).inc()
        if job.ended:
            log.info(
                "job ended",
                extra={"job": job.id, "state": str(job.state), "error": job.error},
            )

    # -- explicit dispatch (AgentDispatchService) ---------------------------------------------

    def create_dispatch(
        self,
        *,
        agent_name: str,
        room: str,
        metadata: str = "",
        attributes: Mapping[str, str] | None = None,
        deployment: str = "",
        room_sid: str = "",
        pin_version: str = "",
    ) -> Dispatch:
        if not room:
            raise InvalidRequest("room is required")
        dispatch = Dispatch(
            id=new_id("AD_"),
            agent_name=agent_name,
            room=room,
            metadata=metadata,
            attributes=dict(attributes or {}),
            deployment=deployment,
        )
        job = Job(
            id=new_id("AJ_"),
            dispatch_id=dispatch.id,
            agent_name=agent_name,
            room=room,
            room_sid=room_sid or self._room_sid(room),
            metadata=metadata,
            attributes=dict(dispatch.attributes),
            deployment=deployment,
            pin_version=pin_version,
        )
        self.scheduler.submit(job)  # raises NoCapacity before anything is recorded
        # The job is in the book; record the dispatch that owns it.
        self.book.add_dispatch(dispatch)
        dispatch.job_ids.append(job.id)
        log.info(
            "dispatch created",
            extra={"dispatch": dispatch.id, "agent_name": agent_name, "room": room},
        )
        return dispatch

    def _room_sid(self, room: str) -> str:
        for d in self.book.in_room(room):
            for job_id in d.job_ids:
                job = self.book.jobs.get(job_id)
                if job is not None:
                    return job.room_sid
        return new_id("RM_")

    def list_dispatches(self, room: str, dispatch_id: str = "") -> list[Dispatch]:
        found = self.book.in_room(room)
        if dispatch_id:
            found = [d for d in found if d.id == dispatch_id]
        return found

    def delete_dispatch(self, dispatch_id: str, room: str) -> Dispatch:
        dispatch = self.book.dispatches.get(dispatch_id)
        if dispatch is None or dispatch.room != room or dispatch.deleted_at:
            raise NotFound(f"no dispatch '{dispatch_id}' in room '{room}'")
        for job_id in dispatch.job_ids:
            job = self.book.jobs.get(job_id)
            if job is not None and job.state not in ENDED:
                self.scheduler.terminate(job, f"dispatch {dispatch_id} deleted")
        self.book.delete_dispatch(dispatch)
        log.info("dispatch deleted", extra={"dispatch": dispatch_id, "room": room})
        return dispatch

    # -- restart ------------------------------------------------------------------------------

    def restore(self, dispatches: list[Dispatch], jobs: list[Job], adopt_within: float) -> None:
        """Take back what the last run left open: queue pending jobs again; running jobs wait
        `adopt_within` seconds for their worker to reconnect and report them."""
        for dispatch in dispatches:
            self.book.add_dispatch(dispatch, record=False)
        now = time.time()
        for job in jobs:
            job.worker_id = ""
            self.book.jobs[job.id] = job
            owner = self.book.dispatches.get(job.dispatch_id)
            if owner is not None:
                owner.job_ids.append(job.id)
            if job.state == JobState.PENDING:
                job.created_at = max(job.created_at, now - self.settings.queue_timeout / 2)
                self.scheduler.requeue(job)
            else:
                self._orphans[job.id] = now + adopt_within
        if jobs:
            log.info("restored open jobs", extra={"jobs": len(jobs)})

    def fail_unadopted(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for job_id, deadline in list(self._orphans.items()):
            job = self.book.jobs.get(job_id)
            if job is None or job.ended or job.worker_id:
                del self._orphans[job_id]
            elif now >= deadline:
                del self._orphans[job_id]
                self.book.transition(
                    job,
                    JobState.FAILED,
                    "voicefleet restarted and no worker reported this job after reconnecting",
                )
