"""Where a batch's workers run: in this process, in local worker processes, or on Ray.

Every runner takes the documents (an iterator of ``DocTask``, read lazily: only the ones
in flight are in memory) and yields each document's line as it finishes, in completion
order; ``in_flight`` says which documents a worker holds right now.  Each worker loads the
model once.  A worker that dies (killed, out of memory) costs the document it held: that
document gets an error line and a fresh worker takes its place.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..core.errors import KvcliError
from .spec import BatchSpec
from .work import ContextHook, DocTask, Worker, error_text

#: How a worker that could not start reports it: ``(message, option)`` of the KvcliError.
Fatal = tuple[str, str | None]


def _fatal(exc: BaseException) -> Fatal:
    return (error_text(exc), exc.option if isinstance(exc, KvcliError) else None)


def _died(task: DocTask, why: str) -> dict:
    return {"kind": "document", "path": task.path, "sha256": task.sha256, "error": why}


class Runner:
    label = "runner"

    def __init__(self, spec: BatchSpec, workers: int = 1, hook: ContextHook | None = None) -> None:
        self.spec, self.workers, self.hook = spec, workers, hook
        self.in_flight: dict[Any, DocTask] = {}
        self.on_status: Callable[[str], None] = lambda text: None

    def run(self, tasks: Iterable[DocTask]) -> Iterator[dict]:
        raise NotImplementedError


class InProcessRunner(Runner):
    """One worker: this process (no start-up cost; the model loads once)."""

    label = "in-process"

    def run(self, tasks: Iterable[DocTask]) -> Iterator[dict]:
        self.on_status(f"loading {self.spec.model}")
        worker = Worker(self.spec, hook=self.hook)
        self.on_status("running")
        for task in tasks:
            self.in_flight = {0: task}
            line = worker.run(task)
            self.in_flight = {}
            yield line


# ---- local worker processes ---------------------------------------------------------------------
def threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` processes sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // workers)


def _serve(spec: BatchSpec, wid: int, threads: int, inbox: Any, outbox: Any, hook: ContextHook | None) -> None:
    """A worker process: load the model once, then run documents until told to stop (None)
    or until the driver is gone (killed: nobody would read the results)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    parent = os.getppid()
    try:
        worker = Worker(spec, threads=threads, hook=hook)
    except BaseException as exc:
        outbox.put(("fatal", wid, _fatal(exc)))
        return
    outbox.put(("ready", wid, None))
    while True:
        try:
            task = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if task is None:
            return
        outbox.put(("done", wid, worker.run(task)))


class ProcessRunner(Runner):
    """``workers`` local processes (spawned: a clean interpreter each, safe with torch's
    threads), each loading the model once; one document each at a time."""

    label = "processes"

    def __init__(self, spec: BatchSpec, workers: int = 2, hook: ContextHook | None = None) -> None:
        super().__init__(spec, workers, hook)
        self._ctx = mp.get_context("spawn")
        self._procs: dict[int, Any] = {}
        self._inboxes: dict[int, Any] = {}
        self._outbox: Any = None
        self._failed_starts = 0

    def _start(self, wid: int) -> None:
        inbox = self._ctx.Queue()
        proc = self._ctx.Process(
            target=_serve,
            args=(self.spec, wid, threads_per_worker(self.workers), inbox, self._outbox, self.hook),
            daemon=True,
            name=f"kvcli-batch-{wid}",
        )
        # SIGINT blocked while it starts (the child inherits the mask), so a Ctrl-C never
        # reaches a worker before it has set it to be ignored.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._procs[wid], self._inboxes[wid] = proc, inbox

    def run(self, tasks: Iterable[DocTask]) -> Iterator[dict]:
        self._outbox = self._ctx.Queue()
        pending = iter(tasks)
        exhausted = False
        ready: set[int] = set()
        self.on_status(f"starting {self.workers} workers, loading {self.spec.model}")
        try:
            for wid in range(self.workers):
                self._start(wid)
            while True:
                for wid in sorted(ready - set(self.in_flight)):
                    task = None if exhausted else next(pending, None)
                    if task is None:
                        exhausted = True
                        break
                    self._inboxes[wid].put(task)
                    self.in_flight[wid] = task
                if exhausted and not self.in_flight:
                    return
                try:
                    kind, wid, payload = self._outbox.get(timeout=0.5)
                except queue.Empty:
                    yield from self._reap(ready)
                    continue
                if kind == "fatal":
                    raise KvcliError(payload[0], option=payload[1])
                if kind == "ready":
                    ready.add(wid)
                    if len(ready) == 1:  # the first worker is at work: rates count from now
                        self.on_status("running")
                else:
                    self.in_flight.pop(wid, None)
                    yield payload
        finally:
            self._stop()

    def _reap(self, ready: set[int]) -> Iterator[dict]:
        """Workers that died: the document each held gets an error line; a new worker starts."""
        for wid, proc in list(self._procs.items()):
            if proc.is_alive():
                continue
            proc.join()
            task = self.in_flight.pop(wid, None)
            ready.discard(wid)
            if task is not None:
                yield _died(task, f"the worker process died (exit status {proc.exitcode}; out of memory?)")
            else:  # died while loading the model (a fatal start says so itself, before this)
                self._failed_starts += 1
                if self._failed_starts > self.workers:
                    raise KvcliError(
                        f"worker processes keep dying while loading the model (exit status {proc.exitcode})"
                    )
            self._start(wid)

    def _stop(self) -> None:
        for wid, inbox in self._inboxes.items():
            if wid not in self.in_flight:
                try:
                    inbox.put_nowait(None)
                except Exception:
                    pass
        for proc in self._procs.values():
            proc.join(timeout=0 if self.in_flight else 5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for q in [*self._inboxes.values(), self._outbox]:
            if q is not None:
                q.close()
                q.cancel_join_thread()
        self._procs.clear()
        self._inboxes.clear()
        self.in_flight = {}


# ---- Ray ------------------------------------------------------------------------------------------
class RayActor:
    """The Ray actor: a ``Worker`` in a process that Ray places; a failed start is kept and
    reported by ``ready`` (one line, not an actor crash)."""

    def __init__(self, spec: BatchSpec, threads: int, hook: ContextHook | None) -> None:
        self.fatal: Fatal | None = None
        try:
            self.worker: Worker | None = Worker(spec, threads=threads, hook=hook)
        except BaseException as exc:
            self.worker, self.fatal = None, _fatal(exc)

    def ready(self) -> Fatal | None:
        return self.fatal

    def run(self, task: DocTask) -> dict:
        assert self.worker is not None
        return self.worker.run(task)


def import_ray() -> Any:
    """Ray, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise KvcliError("--ray needs Ray, which is not installed: pip install 'kvcli[ray]'", option="ray") from None
    return ray


class RayRunner(Runner):
    """``workers`` Ray actors, each holding the model (one CPU each unless ``cpus`` says
    otherwise); documents go to them as bytes and their lines come back to this process,
    the single writer.  ``address``: a running cluster (``auto``, ``ray://host:10001``,
    ``host:6379``); None starts a local Ray for the run (an already initialized Ray is used
    as it is)."""

    label = "ray"

    def __init__(
        self,
        spec: BatchSpec,
        workers: int = 1,
        address: str | None = None,
        cpus: float = 1,
        hook: ContextHook | None = None,
    ) -> None:
        super().__init__(spec, workers, hook)
        self.address, self.cpus = address, cpus

    def run(self, tasks: Iterable[DocTask]) -> Iterator[dict]:
        ray = import_ray()
        started = False
        if not ray.is_initialized():
            self.on_status(f"starting Ray{' at ' + self.address if self.address else ' (local)'}")
            kwargs: dict[str, Any] = dict(logging_level=logging.ERROR, log_to_driver=False)
            if self.address:  # a cluster's own settings stand (resources, dashboard)
                kwargs["address"] = self.address
            else:
                kwargs["include_dashboard"] = False
                kwargs["num_cpus"] = max(os.cpu_count() or 1, int(self.workers * self.cpus + 0.999))
            try:
                ray.init(**kwargs)
            except Exception as exc:
                raise KvcliError(f"--ray: cannot connect to Ray: {error_text(exc)}", option="ray") from None
            started = True
        remote = ray.remote(num_cpus=self.cpus)(RayActor)
        threads = max(1, int(self.cpus))
        actors: list[Any] = []
        try:
            self.on_status(f"starting {self.workers} Ray actors, loading {self.spec.model}")
            actors = [remote.remote(self.spec, threads, self.hook) for _ in range(self.workers)]
            for fatal in ray.get([a.ready.remote() for a in actors]):
                if fatal is not None:
                    raise KvcliError(fatal[0], option=fatal[1])
            self.on_status("running")
            yield from self._dispatch(ray, remote, actors, threads, iter(tasks))
        finally:
            for actor in actors:
                try:
                    ray.kill(actor)
                except Exception:
                    pass
            self.in_flight = {}
            if started:
                ray.shutdown()

    def _dispatch(self, ray: Any, remote: Any, actors: list[Any], threads: int, pending: Iterator[DocTask]):
        owner: dict[Any, Any] = {}  # object ref -> the actor running it
        idle = list(actors)
        exhausted = False
        while True:
            while idle and not exhausted:
                task = next(pending, None)
                if task is None:
                    exhausted = True
                    break
                actor = idle.pop()
                ref = actor.run.remote(task)
                owner[ref], self.in_flight[ref] = actor, task
            if not self.in_flight:
                return
            done, _ = ray.wait(list(self.in_flight), num_returns=1)
            for ref in done:
                task, actor = self.in_flight.pop(ref), owner.pop(ref)
                try:
                    line = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    line = _died(task, f"the Ray actor died ({error_text(exc)[:200]})")
                    actor = remote.remote(self.spec, threads, self.hook)
                    actors.append(actor)
                except ray.exceptions.RayError as exc:
                    line = _died(task, f"Ray: {error_text(exc)[:300]}")
                idle.append(actor)
                yield line
