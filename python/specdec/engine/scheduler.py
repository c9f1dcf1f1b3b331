"""The scheduler: one worker thread owns the engine and steps every running request together.

Requests move through these places:
    inbox    submitted, not yet prepared (``engine.prepare``) or validated by the engine
    waiting  started (``engine.start`` passed), waiting for a running slot
    running  stepped together by ``engine.step_batch`` (at most ``max_running``)
    unread   out of the batch until their consumer reads (back-pressure, below)
Requests join and leave between steps. Every engine call happens on the worker thread, so the engine needs no
locks; a prompt still in text form is tokenized there too (the server tokenizes text on a thread of its own
before it submits, so its requests arrive as token ids).

Results go back to each request's ``asyncio.Queue`` with ``loop.call_soon_threadsafe``. A cancel or an expired
deadline only marks the request; before its next step the worker calls ``engine.finish`` (which frees its KV
caches), so generation stops within one step. The bounded admission queue (inbox + waiting) raises
``QueueFull`` beyond ``max_queue``.

Exclusive jobs (the benchmark) run on the worker thread too: when one is pending, no waiting request is
admitted, the running ones finish, the job runs alone, and then admission resumes. A job calls its ``check``
once per engine step, which raises ``JobCancelled`` once the job is cancelled, past its deadline or the
scheduler is stopping, so a job never holds the engine more than one step after that.

Back-pressure: a request whose consumer has not taken ``max_unread`` of its step events (a stream whose client
stopped reading) leaves the running batch, keeping its KV cache, and its slot goes to the next waiting request;
it rejoins once its consumer catches up. One left unread for ``unread_timeout_s`` is cancelled, and so is the
longest-unread one when more than ``max_running`` are out (their caches are memory the server is not sized for).

The scheduler knows nothing of how ``step_batch`` batches its forwards; it only hands it the running list.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from specdec.types import Completion, FinishReason, ParsedRequest

if TYPE_CHECKING:
    from specdec.engine.sequence import StepOutput

log = logging.getLogger("specdec.scheduler")

# How often an idle worker wakes to check deadlines of requests held up behind an exclusive job or out of the
# batch unread.
IDLE_WAKE_S = 0.25


class QueueFull(Exception):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Closed(Exception):
    """The scheduler no longer admits requests (shutting down)."""


class JobCancelled(Exception):
    """The job's handle was cancelled or passed its deadline, or the scheduler is stopping (args[0]: the reason)."""


class JobOverLimit(Exception):
    """The job ran past the time it was given (``submit_job(max_s=...)``)."""


class InternalError(Exception):
    """The engine failed while stepping this request (the cause is logged with its traceback)."""


class Observer(Protocol):
    """Told about each request's life on the worker thread (``specdec.serving.metrics.Metrics`` implements it)."""

    def first_token(self, ttft_s: float) -> None: ...
    def tokens(self, n: int, seconds_per_token: float | None) -> None:
        """n tokens emitted by one step; seconds_per_token is the gap since the previous step / n (None for the first)."""
    def finished(self, completion: Completion) -> None: ...
    def failed(self, kind: str) -> None: ...


class _NullObserver:
    def first_token(self, ttft_s: float) -> None:
        pass

    def tokens(self, n: int, seconds_per_token: float | None) -> None:
        pass

    def finished(self, completion: Completion) -> None:
        pass

    def failed(self, kind: str) -> None:
        pass


# Events a handle's queue receives, in order: ("step", StepOutput)*, then one of ("done", Completion),
# ("error", ValueError | InternalError); or for jobs ("progress", dict)*, then ("result", value) or ("error", exc).
Event = tuple[str, Any]


class Handle:
    """One request (or job) as the event loop and the worker thread share it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request_id: str, deadline: float | None = None) -> None:
        self.loop = loop
        self.request_id = request_id
        self.deadline = deadline  # time.monotonic() value, or None
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.arrival = time.perf_counter()
        self.cancel_reason: FinishReason | None = None
        self.done = False  # set by the worker when the final event is sent
        # Step events put and taken: each counter has one writer (the worker, the event loop), so no lock.
        self.put_steps = 0
        self.taken_steps = 0
        self._wake: Callable[[], None] = lambda: None
        # worker-side state
        self.parsed: ParsedRequest | None = None
        self.seq = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.logprobs: list[float] = []
        self.top_logprobs: list = []
        self.unread_since: float | None = None  # when it left the batch for want of a reader

    def cancel(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """Ask the worker to end this request before its next step. Safe from any thread; idempotent."""
        if self.cancel_reason is None and not self.done:
            self.cancel_reason = reason
            self._wake()

    def put(self, kind: str, payload: Any) -> None:
        """Worker side: hand one event to the event loop."""
        if kind in ("done", "error", "result"):
            self.done = True
        elif kind == "step":
            self.put_steps += 1
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def get(self) -> Event:
        event = await self.queue.get()
        if event[0] == "step":
            self.taken_steps += 1
            if self.unread_since is not None:  # out of the batch for want of a reader: it may rejoin now
                self._wake()
        return event

    @property
    def unread(self) -> int:
        """Step events the worker has put and the consumer has not taken yet."""
        return self.put_steps - self.taken_steps

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass
class _Job:
    handle: Handle
    fn: Callable[[Any, Callable[[dict], None], Callable[[], None]], Any]  # fn(engine, progress, check) -> result
    max_s: float | None = None  # the job is cut off after this long (JobOverLimit)


class Scheduler:
    def __init__(
        self,
        engine,
        *,
        max_queue: int = 64,
        max_running: int = 8,
        max_unread: int = 64,
        unread_timeout_s: float = 60.0,
        observer: Observer | None = None,
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if max_unread < 1:
            raise ValueError(f"max_unread must be >= 1, got {max_unread}")
        if not unread_timeout_s > 0:
            raise ValueError(f"unread_timeout_s must be > 0, got {unread_timeout_s}")
        self.engine = engine
        self.max_queue = max_queue
        self.max_running = max_running
        self.max_unread = max_unread
        self.unread_timeout_s = unread_timeout_s
        self.observer: Observer = observer or _NullObserver()
        self._cv = threading.Condition()
        self._inbox: deque[Handle] = deque()
        self._waiting: deque[Handle] = deque()
        self._running: list[Handle] = []
        self._unread: list[Handle] = []  # out of the batch until their consumer catches up
        self._ending: list[Handle] = []  # reaped, their caches being freed: still busy until they are
        self._jobs: deque[_Job] = deque()
        self._job_running: _Job | None = None
        self._closed = False
        self._stop = False
        self._step_s_ema: float | None = None  # for the retry hint
        self.steps = 0  # engine steps taken (tests and diagnostics)
        # Every sequence started, for as long as anything references it: a leaked KV cache shows up here.
        self._seqs: weakref.WeakSet = weakref.WeakSet()
        self._thread = threading.Thread(target=self._run, name="specdec-scheduler", daemon=True)

    # ---- event-loop side ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> int:
        with self._cv:
            return len(self._running)

    @property
    def waiting(self) -> int:
        with self._cv:
            return len(self._inbox) + len(self._waiting)

    @property
    def unread(self) -> int:
        """Requests out of the batch until their consumer reads."""
        with self._cv:
            return len(self._unread)

    @property
    def busy(self) -> bool:
        """True while any request or job is queued, running or being started."""
        with self._cv:
            return bool(self._inbox or self._waiting or self._running or self._unread or self._ending or self._jobs
                        or self._job_running)  # fmt: skip

    def snapshot(self) -> dict[str, int]:
        """Read-only counts: queued, running, jobs, and started sequences still unfinished or holding a KV cache.

        When the server is idle all of them are 0; anything else is a request or cache that was not freed.
        """
        with self._cv:
            seqs = list(self._seqs)
            return {
                "inbox": len(self._inbox),
                "waiting": len(self._waiting),
                "running": len(self._running),
                "unread": len(self._unread),
                "jobs": len(self._jobs) + int(self._job_running is not None),
                "unfinished": sum(not s.finished for s in seqs),
                "holding_cache": sum(s.holds_cache for s in seqs),
            }

    def submit(self, handle: Handle, parsed: ParsedRequest) -> None:
        """Queue a request; raise QueueFull beyond max_queue, Closed when shutting down."""
        with self._cv:
            if self._closed:
                raise Closed("the server is shutting down and admits no new requests")
            queued = len(self._inbox) + len(self._waiting)
            if queued >= self.max_queue:
                retry = self._retry_hint()
                raise QueueFull(
                    f"the admission queue is full ({queued} waiting, max_queue {self.max_queue}, "
                    f"{len(self._running)} running); retry after {retry:.1f} s",
                    retry,
                )
            handle.parsed = parsed
            handle._wake = self._wake
            self._inbox.append(handle)
            self._cv.notify()

    def submit_job(
        self, handle: Handle, fn: Callable[[Any, Callable[[dict], None], Callable[[], None]], Any], max_s: float | None = None
    ) -> None:
        """Queue an exclusive job (one at a time), cut off after ``max_s`` seconds of running; raise QueueFull if one
        is already queued or running."""
        with self._cv:
            if self._closed:
                raise Closed("the server is shutting down and admits no new requests")
            if self._jobs or self._job_running:
                raise QueueFull("a benchmark is already running on this server; retry when it has finished", 60.0)
            handle._wake = self._wake
            self._jobs.append(_Job(handle, fn, max_s))
            self._cv.notify()

    def close(self) -> None:
        """Stop admitting; what is queued or running carries on."""
        with self._cv:
            self._closed = True

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything left, end the worker and wait for it (a running job ends at its next step)."""
        with self._cv:
            self._closed = True
            self._stop = True
            job = self._job_running
            self._cv.notify()
        if job is not None:
            job.handle.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _retry_hint(self) -> float:
        """A guess at when a slot frees: about one request's worth of steps of the current batch."""
        step = self._step_s_ema or 0.05
        return float(min(30.0, max(0.5, step * 32)))

    # ---- worker side ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._inbox or self._waiting or self._running or self._unread or self._jobs):
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self._start_new()
                self._reap()
                if self._jobs and not self._running:
                    self._run_job(self._jobs[0])
                    continue
                self._admit()
                if self._running:
                    self._step()
                elif self._waiting or self._unread:
                    with self._cv:  # held up behind a job or a reader: wake now and then for deadlines and reads
                        self._cv.wait(IDLE_WAKE_S)
            except Exception:  # a bug here must not kill the worker: fail what is running, keep serving
                log.exception("scheduler iteration failed")
                self._fail_running("scheduler iteration failed")
        self._shutdown_all()

    def _start_new(self) -> None:
        while True:
            with self._cv:
                if not self._inbox:
                    return
                h = self._inbox.popleft()
            if h.cancel_reason is not None or h.expired(time.monotonic()):
                self._complete(h, self._end_reason(h, time.monotonic()))
                continue
            try:
                h.seq = self.engine.start(self.engine.prepare(h.parsed))
            except ValueError as e:
                self.observer.failed("invalid_argument")
                h.put("error", e)
                continue
            except Exception as e:
                log.exception("starting request %s failed", h.request_id)
                self.observer.failed("internal")
                h.put("error", InternalError(f"{type(e).__name__} while starting request {h.request_id}"))
                continue
            with self._cv:
                self._seqs.add(h.seq)
                self._waiting.append(h)

    @staticmethod
    def _end_reason(h: Handle, now: float) -> FinishReason:
        """A request past its deadline ended by it, even when the cancel that its call's end raised came first."""
        return FinishReason.DEADLINE if h.expired(now) else h.cancel_reason or FinishReason.DEADLINE

    def _reap(self) -> None:
        """End cancelled, expired and long-unread requests before the next step; their caches are freed at once."""
        now = time.monotonic()
        for h in self._unread:
            overflow = h.unread_since == -math.inf
            if overflow or (h.unread_since is not None and now - h.unread_since > self.unread_timeout_s):
                why = "more unread streams than max_running" if overflow else f"unread for {self.unread_timeout_s:g} s"
                log.warning("request cancelled: its stream was not read", extra={"fields": {
                    "request_id": h.request_id, "unread_events": h.unread, "why": why}})  # fmt: skip
                h.cancel()
        with self._cv:
            live = (*self._waiting, *self._running, *self._unread)
            ended = [h for h in live if h.cancel_reason is not None or h.expired(now)]
            if not ended:
                return
            self._waiting = deque(h for h in self._waiting if h not in ended)
            self._running = [h for h in self._running if h not in ended]
            self._unread = [h for h in self._unread if h not in ended]
            self._ending = ended
        for h in ended:
            reason = self._end_reason(h, now)
            try:
                self.engine.finish(h.seq, reason)
            except Exception:
                log.exception("engine.finish failed for request %s", h.request_id)
            self._complete(h, reason)
        with self._cv:
            self._ending = []

    def _admit(self) -> None:
        with self._cv:
            stalled = [h for h in self._running if h.unread >= self.max_unread]
            if stalled:
                now = time.monotonic()
                for h in stalled:
                    h.unread_since = now
                self._running = [h for h in self._running if h not in stalled]
                self._unread.extend(stalled)
                for h in self._unread[: max(0, len(self._unread) - self.max_running)]:  # the longest-unread first
                    h.unread_since = -math.inf  # _reap cancels it before the next step
            caught_up = [h for h in self._unread if h.unread < self.max_unread]
            if caught_up:  # ahead of the waiting requests: they were admitted first
                self._unread = [h for h in self._unread if h not in caught_up]
                for h in caught_up:
                    h.unread_since = None
                self._waiting.extendleft(reversed(caught_up))
            if self._jobs:
                return  # drain for the exclusive job
            while self._waiting and len(self._running) < self.max_running:
                self._running.append(self._waiting.popleft())

    def _step(self) -> None:
        with self._cv:
            batch = list(self._running)
        t0 = time.perf_counter()
        outs = self._step_isolating(batch)
        now = time.perf_counter()
        dt = now - t0
        self.steps += 1
        self._step_s_ema = dt if self._step_s_ema is None else 0.8 * self._step_s_ema + 0.2 * dt
        finished = []
        for h, out in zip(batch, outs):
            if out is None:
                continue  # failed, and already answered
            n = len(out.token_ids)
            if n:
                if h.first_token_at is None:
                    h.first_token_at = now
                    self.observer.first_token(now - h.arrival)
                    self.observer.tokens(n, None)
                else:
                    self.observer.tokens(n, (now - h.last_token_at) / n)
                h.last_token_at = now
                if out.logprobs:
                    h.logprobs.extend(out.logprobs)
                if out.top_logprobs:
                    h.top_logprobs.extend(out.top_logprobs)
            h.put("step", out)
            if out.finished:
                finished.append(h)
        if finished:
            with self._cv:
                self._running = [h for h in self._running if h not in finished]
            for h in finished:
                self._complete(h, h.seq.finish_reason or FinishReason.LENGTH)

    def _step_isolating(self, batch: list[Handle]) -> list[StepOutput | None]:
        """One engine step for the batch. If it raises, each request steps alone, so that a request that breaks
        the engine fails by itself instead of taking the rest of its batch with it. None marks a failed request."""
        emitted = [len(h.seq.all_ids) for h in batch]
        try:
            return self.engine.step_batch([h.seq for h in batch])
        except Exception as e:
            ids = ", ".join(h.request_id for h in batch)
            log.exception("engine step failed for requests %s", ids)
            if len(batch) == 1:
                self._fail(batch, f"{type(e).__name__} in the engine step of request {ids}")
                return [None]
        outs: list[StepOutput | None] = []
        for h, before in zip(batch, emitted):
            try:
                if len(h.seq.all_ids) != before:
                    # The failed step already appended tokens that the client never received: no clean retry.
                    raise RuntimeError("the failed batch step had already emitted tokens for it")
                self.engine.recover(h.seq)
                outs.append(self.engine.step_batch([h.seq])[0])
            except Exception as e:
                log.exception("engine step failed for request %s stepped alone", h.request_id)
                self._fail([h], f"{type(e).__name__} in the engine step of request {h.request_id}")
                outs.append(None)
        return outs

    def _fail(self, batch: list[Handle], message: str) -> None:
        with self._cv:
            self._running = [h for h in self._running if h not in batch]
        for h in batch:
            try:
                self.engine.finish(h.seq, FinishReason.ERROR)
            except Exception:
                log.exception("engine.finish failed for request %s", h.request_id)
            self.observer.failed("internal")
            log.error("request failed", extra={"fields": {"request_id": h.request_id, "finish_reason": "error"}})
            h.put("error", InternalError(message))

    def _fail_running(self, message: str) -> None:
        with self._cv:
            batch = list(self._running)
        if batch:
            self._fail(batch, message)

    def _completion(self, h: Handle, reason: FinishReason) -> Completion:
        seq = h.seq
        end = h.last_token_at or time.perf_counter()
        spec = h.parsed.template.speculation.method if h.parsed else None
        method = (spec or self.engine.config.method).value
        if seq is None:  # ended before it started: the seed it asked for, if any
            seed = h.parsed.template.sampling.seed if h.parsed else None
            return Completion(h.request_id, [], "", None, None, reason, None, seed, method, 0, 0, end - h.arrival, None,
                              end - h.arrival)  # fmt: skip
        m = seq.metrics
        first_step = m.first_step_at if m.first_step_at is not None else end
        return Completion(
            request_id=h.request_id,
            token_ids=list(seq.output_ids),
            text=seq.text,
            logprobs=list(h.logprobs) if seq.request.reports_logprobs else None,
            top_logprobs=list(h.top_logprobs) if seq.request.top_logprobs else None,
            finish_reason=reason,
            matched_stop=seq.matched_stop,
            seed=seq.seed,
            method=method,
            prompt_tokens=m.prompt_tokens,
            completion_tokens=m.completion_tokens,
            queue_s=max(0.0, first_step - h.arrival),
            ttft_s=None if h.first_token_at is None else h.first_token_at - h.arrival,
            e2e_s=end - h.arrival,
            proposed=m.proposed,
            accepted=m.accepted,
            verify_steps=m.verify_steps,
            acceptance_rate=m.acceptance_rate,
            mean_accepted_length=m.mean_accepted_length,
            per_position_acceptance=list(m.per_position_acceptance),
            cached_prompt_tokens=m.cached_prompt_tokens,
        )

    def _complete(self, h: Handle, reason: FinishReason) -> None:
        c = self._completion(h, reason)
        self.observer.finished(c)
        log.info("request finished", extra={"fields": c.log_fields()})
        h.put("done", c)

    def _run_job(self, job: _Job) -> None:
        with self._cv:
            self._jobs.popleft()
            self._job_running = job
        h = job.handle
        cutoff = None if job.max_s is None else time.monotonic() + job.max_s

        def check() -> None:
            now = time.monotonic()
            if h.cancel_reason is not None or h.expired(now):
                raise JobCancelled(self._end_reason(h, now))
            if self._stop:  # stop() may have come before this job was the running one
                raise JobCancelled(FinishReason.CANCELLED)
            if cutoff is not None and now >= cutoff:
                raise JobOverLimit(f"ran past its limit of {job.max_s:g} s")

        def progress(event: dict) -> None:
            check()
            h.put("progress", event)

        try:
            check()
            result = job.fn(self.engine, progress, check)
        except (JobCancelled, JobOverLimit) as e:
            h.put("error", e)
        except ValueError as e:
            h.put("error", e)
        except Exception as e:
            log.exception("job %s failed", h.request_id)
            h.put("error", InternalError(f"{type(e).__name__} in {h.request_id}: {e}"))
        else:
            h.put("result", result)
        finally:
            with self._cv:
                self._job_running = None

    def _shutdown_all(self) -> None:
        """The worker is stopping: end whatever is left as cancelled and free it."""
        with self._cv:
            left = [*self._inbox, *self._waiting, *self._running, *self._unread]
            jobs = list(self._jobs)
            self._inbox.clear()
            self._waiting.clear()
            self._running.clear()
            self._unread.clear()
            self._jobs.clear()
        for h in left:
            if h.seq is not None:
                try:
                    self.engine.finish(h.seq, FinishReason.CANCELLED)
                except Exception:
                    log.exception("engine.finish failed for request %s", h.request_id)
            self._complete(h, FinishReason.CANCELLED)
        for job in jobs:
            job.handle.put("error", JobCancelled(FinishReason.CANCELLED))
