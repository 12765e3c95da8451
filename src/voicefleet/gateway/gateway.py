"""Gateway mode: voicefleet in front of a LiveKit server, as the worker of every agent it runs.

Each pool of local workers (agent name, namespace, job type) gets one upstream registration
when its first worker registers here, kept while the server runs; LiveKit's jobs for that
agent then reach voicefleet's scheduler and its routing table, queue and versions. Clients of
the LiveKit server change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from voicefleet.config import GatewaySettings
from voicefleet.dispatch.jobs import Job, JobState
from voicefleet.dispatch.registry import PoolKey, Worker
from voicefleet.dispatch.service import DispatchService
from voicefleet.gateway.relay import RelayedJob
from voicefleet.gateway.target import BadTarget, LiveKitTarget, backoff, why_not
from voicefleet.gateway.upstream import CanStart, Upstream, never

log = logging.getLogger("voicefleet.gateway")


class Gateway:
    def __init__(
        self,
        service: DispatchService,
        target: LiveKitTarget,
        settings: GatewaySettings,
        can_start: CanStart = never,
    ) -> None:
        """`can_start(key)`: whether an instance of that pool can be started now (the
        autoscaler's headroom, scale from zero included); such a pool is not full for LiveKit
        even when none of its workers is free (see `upstream_status`)."""
        self._service = service
        self._target = target
        self._settings = settings
        self._can_start = can_start
        self.upstreams: dict[PoolKey, Upstream] = {}
        self._probe: asyncio.Task[None] | None = None
        self._started = False

    async def start(self) -> None:
        try:
            url = self._target.agent_url
        except BadTarget as e:
            log.error("gateway mode is off: %s", e)
            return
        self._started = True
        log.info(
            "gateway mode: voicefleet registers with LiveKit at %s (key %s) as the worker of "
            "each agent its own workers declare",
            url,
            self._target.api_key,
        )
        self._service.on_worker_registered(self._worker_registered)
        self._service.on_pool_change(self._pool_changed)
        self._service.on_job_change(self._job_changed)
        for worker in self._service.workers():
            self._worker_registered(worker)
        self._probe = asyncio.create_task(self._check_target())

    async def aclose(self) -> None:
        """Leave LiveKit: the registrations end; calls running here go on."""
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await asyncio.gather(*(u.aclose() for u in self.upstreams.values()))

    async def run(self) -> None:
        """start(), then aclose() when cancelled: the gateway as one background task."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.aclose()

    async def _check_target(self) -> None:
        """Say at start, in one line, whether the LiveKit server takes voicefleet's key, and
        keep saying why not, with backoff, until it does: workers may register meanwhile."""
        attempt = 0
        while True:
            try:
                async with connect(
                    self._target.agent_url,
                    additional_headers=self._target.headers(),
                    open_timeout=self._settings.connect_timeout,
                    proxy=None,
                ):
                    pass  # opened with this key: enough (closed before any register)
            except (OSError, TimeoutError, WebSocketException) as e:
                delay = backoff(attempt, self._settings.retry_first, self._settings.retry_max)
                attempt += 1
                log.error("gateway: %s; retrying in %gs", why_not(self._target, e), delay)
                await asyncio.sleep(delay)
                continue
            log.info(
                "gateway: LiveKit at %s accepts key %s", self._target.url, self._target.api_key
            )
            return

    def _worker_registered(self, worker: Worker) -> None:
        if worker.key in self.upstreams:
            return
        upstream = Upstream(
            worker.key,
            worker.permissions,
            self._target,
            self._service,
            self._settings,
            self._can_start,
        )
        self.upstreams[worker.key] = upstream
        upstream.start()

    def _pool_changed(self, key: PoolKey) -> None:
        upstream = self.upstreams.get(key)
        if upstream is not None:
            upstream.pool_changed()

    def _job_changed(self, job: Job, previous: JobState | None) -> None:
        if not isinstance(job.upstream, RelayedJob):
            return
        upstream = self.upstreams.get(PoolKey(job.agent_name, job.namespace, job.job_type))
        if upstream is None:
            return
        # This runs inside the dispatcher's handling of a local worker's frame: a fault in
        # relaying it to LiveKit must not end that worker's connection, and its calls with it.
        try:
            upstream.job_changed(job)
        except Exception:
            log.exception("relaying a job's change to LiveKit failed", extra={"job": job.id})
