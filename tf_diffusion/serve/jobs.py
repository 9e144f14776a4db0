"""One generation at a time: a bounded queue of jobs run by one worker thread, with progress and interrupts.

The model is not shared between threads: every job (a generation, a model switch) runs on the worker,
in submission order. A full queue refuses the job at once (``QueueFull``, answered 503). A job reports
its progress through ``Job.progress`` (set by the generation's step callback) and stops at its next step
when interrupted (``Job.interrupt``), skipped (``Job.skip``: the current batch only) or cancelled
because its client went away; a queued job that is cancelled never starts.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
import time
import uuid
from collections.abc import Callable


class QueueFull(RuntimeError):
    """The queue holds as many jobs as it may."""


class Interrupted(Exception):
    """Raised in a job's step callback to stop it (interrupt, cancel)."""


class Skipped(Exception):
    """Raised in a job's step callback to end the current batch and go on with the next."""


@dataclasses.dataclass
class Progress:
    """Where a job is, as the web UI's ``state`` reports it."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    latents: object = None  # the latest (N, h, w, C) latents, for the preview
    textinfo: str | None = None


class Job:
    """One unit of work for the worker: ``fn(job)`` returns the result of ``future``."""

    def __init__(self, fn: Callable, kind: str, task_id: str | None = None):
        self.fn = fn
        self.kind = kind
        self.id = task_id or f"task({uuid.uuid4().hex[:15]})"
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.progress = Progress(job=kind)
        self.submitted = time.time()
        self.started: float | None = None
        self.interrupted = False
        self.skipped = False
        self.cancelled = False
        self._skip_pending = False

    def interrupt(self) -> None:
        """Stop at the next step; the batches finished so far are the result."""
        self.interrupted = True

    def skip(self) -> None:
        """End the current batch at the next step and go on with the next one."""
        self.skipped = True
        self._skip_pending = True

    def cancel(self) -> None:
        """Stop as interrupt does, and drop the result (its client went away)."""
        self.cancelled = True
        self.interrupted = True

    def check(self) -> None:
        """Raise ``Interrupted`` or ``Skipped`` if asked for; called at every step."""
        if self.interrupted:
            raise Interrupted(self.id)
        if self._skip_pending:
            self._skip_pending = False
            raise Skipped(self.id)


class JobQueue:
    """A worker thread running jobs one at a time from a queue of at most ``size`` waiting jobs."""

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"queue size {size!r} must be an integer >= 1")
        self.size = size
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}  # queued or running, by id
        self.current: Job | None = None
        self.last: Job | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tf-diffusion-worker", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, kind: str, task_id: str | None = None) -> Job:
        """Queue ``fn(job)``; raises ``QueueFull`` when ``size`` jobs already wait."""
        job = Job(fn, kind, task_id)
        with self._lock:
            if job.id in self._jobs:
                raise ValueError(f"force_task_id {job.id!r} is already queued or running")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull(
                    f"the queue is full ({self.size} jobs waiting besides the one running); try again later"
                ) from None
            self._jobs[job.id] = job
        return job

    def find(self, task_id: str | None) -> Job | None:
        """The queued or running job of that id; None: the running one (or None)."""
        with self._lock:
            return self.current if task_id is None else self._jobs.get(task_id)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the worker after the running job (queued jobs are cancelled)."""
        self._stop = True
        with self._lock:
            for job in self._jobs.values():
                job.cancel()
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None or self._stop:
                if job is not None and not job.future.done():
                    job.future.set_exception(Interrupted("the server is stopping"))
                return
            with self._lock:
                self.current = job
            job.started = time.time()
            try:
                if job.cancelled:
                    raise Interrupted(job.id)
                result = job.fn(job)
            except BaseException as error:  # noqa: BLE001 - the worker must survive any job
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
            finally:
                with self._lock:
                    self.current = None
                    self.last = job
                    self._jobs.pop(job.id, None)
