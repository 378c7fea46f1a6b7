"""Where candidate evaluations run: in this process (`LocalExecutor`) or on a Ray cluster (`RayExecutor`).

An executor maps kept-count vectors to `Evaluation`s through the search's `Evaluator`:

    for kept, evaluation in executor.map(candidates):   # in submission order, one by one as they finish
        ...

Both keep the evaluator's cache and counters on the driver (a repeated candidate is a cache hit, counted as one
evaluation, exactly as `Evaluator.__call__` counts it) and yield the results in the order the candidates were
submitted, so a policy sees the same sequence whichever executor runs it: for a fixed seed the history and the
chosen plan are the same (the rewards are the same numbers when the workers compute as the driver would; see
docs/search.md, "Running on a Ray cluster").

`RayExecutor` ships the evaluator (the normalized model, the calibration samples, the original's outputs and
statistics: everything `measure` needs, nothing read from disk) to the object store once (`ray.put`); each worker
is an actor that deserializes it once and then only receives kept-count vectors and returns metric dicts. The
candidates are dispatched as workers free up (at most `depth` queued per worker), the results re-ordered. A worker
that dies is restarted and its tasks retried by Ray (`max_restarts` / `max_task_retries`). Ray is an optional
dependency (`pip install spa-prune[ray]`), imported inside functions only.
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from ..errors import SpaError
from .reward import Evaluation, Evaluator

EXECUTORS = ("local", "ray")
RESTARTS = 3          # a worker may die this many times (restarted, its tasks retried) before the search fails
DEPTH = 2             # candidates queued per worker: the next one is there when the current one finishes
CONNECT_TIMEOUT = 5.0  # seconds to wait for a cluster address to accept a connection


class LocalExecutor:
    """Evaluations in this process, one after the other (lazily: a generator of candidates is consumed as the
    evaluations go, as a plain loop would)."""

    kind = "local"

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator

    def map(self, candidates: Iterable) -> Iterator[tuple[np.ndarray, Evaluation]]:
        for kept in candidates:
            yield kept, self.evaluator(kept)

    def describe(self) -> dict:
        return {"kind": self.kind}

    def close(self) -> None:
        pass


# ---- Ray -----------------------------------------------------------------------------------------------------------
def import_ray():
    try:
        import ray
    except ImportError as e:
        raise SpaError(f"--executor ray needs Ray: pip install spa-prune[ray] ({e})")
    return ray


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of a cluster address `HOST:PORT` or `ray://HOST:PORT`."""
    host_port = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, sep, port = host_port.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SpaError(f"--ray-address must be HOST:PORT, ray://HOST:PORT or 'auto', got '{address}'")
    return host.strip("[]"), int(port)


def check_address(address: str) -> None:
    """A cluster address that accepts no connection is refused at once: Ray's own client would retry for
    minutes."""
    host, port = parse_address(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise SpaError(f"no Ray cluster at {address} ({reason.lower()}): start one with 'ray start --head', give "
                       "its address, 'auto' for the one this machine belongs to, or leave --ray-address out for "
                       "a local instance")


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray: `None` starts a local instance bound to 127.0.0.1 (`num_cpus` CPUs, default
    all), 'auto' joins the cluster this machine belongs to, anything else is a cluster address. Returns True when
    this call connected (the caller then disconnects with `ray.shutdown()`), False when Ray was already
    initialized (that connection is used, whatever `address` says). Errors are one line, before any work."""
    if address not in (None, "auto"):
        parse_address(address)
    ray = import_ray()
    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}   # the search's stderr is its progress line
    main_thread = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        if address is None:
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                     **quiet)
        else:
            if address != "auto":
                check_address(address)
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SpaError(f"cannot connect to Ray ({address or 'local instance'}): {str(e).splitlines()[0]}")
    finally:
        if on_term is not None:   # ray.init installs its own SIGTERM handler: the caller's (the CLI's clean stop)
            signal.signal(signal.SIGTERM, on_term)
    return True


class EvaluatorWorker:
    """A Ray actor: the search's evaluator, deserialized once (at its first candidate, and again after a
    restart), measuring candidates with `threads` threads."""

    def __init__(self, threads: int):
        self.threads = threads
        self.evaluator = None
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:  # pragma: no cover - an evaluator without torch
            pass

    def measure(self, shipped: list, key: tuple) -> tuple[dict, float]:
        """`shipped`: [reference to the evaluator] (nested, so only the first call of a worker reads it; a
        restarted worker gets it again with the retried call)."""
        if self.evaluator is None:
            import ray

            self.evaluator = ray.get(shipped[0])
            if hasattr(self.evaluator, "threads"):
                self.evaluator.threads = self.threads      # onnxruntime
        t = time.perf_counter()
        metrics = dict(self.evaluator.measure(np.asarray(key, dtype=np.int64)))
        return metrics, time.perf_counter() - t

    def pid(self) -> int:
        return os.getpid()


class RayExecutor:
    """Evaluations on Ray actors (see the module docstring). `address`: as `connect`; `workers`: actors (default
    the cluster's CPUs // `threads`); `threads`: CPUs (and torch/onnxruntime threads) per worker."""

    kind = "ray"

    def __init__(self, evaluator: Evaluator, address: str | None = None, workers: int | None = None,
                 threads: int = 1, restarts: int = RESTARTS, depth: int = DEPTH):
        if workers is not None and workers < 1:
            raise SpaError(f"workers must be at least 1, got {workers}")
        ray = import_ray()
        self.ray, self.evaluator, self.address, self.depth = ray, evaluator, address, depth
        self.owns_connection = connect(address)
        self.actors: list = []
        self._running: dict = {}
        try:
            if workers is None:
                workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
            shipped = copy.copy(evaluator)
            shipped.cache = {}
            try:
                self._ref = ray.put(shipped)   # once: every worker reads the same object
            except Exception as e:  # whatever pickling raises
                raise SpaError(f"the evaluator cannot be shipped to Ray workers: {e}")
            actor = ray.remote(num_cpus=threads, max_restarts=restarts, max_task_retries=restarts)(EvaluatorWorker)
            self.actors = [actor.remote(threads) for _ in range(workers)]
            self.threads, self.workers = threads, workers
        except BaseException:
            self.close()
            raise

    def describe(self) -> dict:
        return {"kind": self.kind, "address": self.address or "local", "workers": self.workers,
                "threads": self.threads}

    def map(self, candidates: Iterable) -> Iterator[tuple[np.ndarray, Evaluation]]:
        ev, ray = self.evaluator, self.ray
        source = iter(candidates)
        order: deque = deque()           # (kept, key) in submission order, not yet yielded
        waiting: deque = deque()         # keys to measure, not yet submitted
        running = self._running = {}     # object ref -> (key, worker index)
        finished: dict = {}              # key -> (metrics, seconds)
        load = [0] * len(self.actors)
        exhausted = False

        def pull() -> bool:
            nonlocal exhausted
            kept = next(source, None)
            if kept is None:
                exhausted = True
                return False
            key = Evaluator.key(kept)
            order.append((kept, key))
            known = key in ev.cache or key in finished or key in waiting or \
                any(k == key for k, _ in running.values())
            if not known:
                waiting.append(key)
            return True

        def fill() -> None:
            for i, actor in enumerate(self.actors):
                while load[i] < self.depth and (waiting or (not exhausted and pull())):
                    if not waiting:
                        continue
                    key = waiting.popleft()
                    running[actor.measure.remote([self._ref], key)] = (key, i)
                    load[i] += 1

        while True:
            fill()
            if not order:
                if exhausted or not pull():
                    return
                continue
            kept, key = order[0]
            if key in ev.cache:
                order.popleft()
                yield kept, ev.lookup(key)
            elif key in finished:
                order.popleft()
                ev.lookup(key)       # counts the request, a miss
                metrics, seconds = finished.pop(key)
                yield kept, ev.record(key, metrics, seconds)
            else:
                ready = []
                while not ready:   # short waits: a signal is handled between them, not inside Ray's call
                    ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
                for ref in ready:
                    done_key, i = running.pop(ref)
                    load[i] -= 1
                    finished[done_key] = self._get(ref)

    def _get(self, ref):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:   # the evaluator raised: the same error as in this process
            raise e.as_instanceof_cause()
        except ray.exceptions.RayActorError as e:
            raise SpaError(f"a Ray worker died {RESTARTS + 1} times evaluating a candidate "
                           f"({str(e).splitlines()[0]})")

    def worker_pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        """Stop the workers (and the Ray connection when this executor made it). Candidates still running (an
        interrupted search) are cancelled first: a killed worker's tasks would be retried, and said so."""
        for ref in list(self._running):
            try:
                self.ray.cancel(ref)
            except Exception:  # already finished, or the cluster is gone
                pass
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # a dead actor or a dead cluster: nothing left to stop
                pass
        self.actors = []
        if self.owns_connection:
            self.ray.shutdown()
            self.owns_connection = False


def make_executor(kind, evaluator: Evaluator, address: str | None = None, workers: int | None = None):
    """The executor named `kind` ('local' or 'ray'), or `kind` itself when it is already one."""
    if not isinstance(kind, str):
        return kind
    if kind == "local":
        if address is not None or workers is not None:
            raise SpaError("a Ray address or worker count needs executor='ray'")
        return LocalExecutor(evaluator)
    if kind == "ray":
        return RayExecutor(evaluator, address, workers)
    raise SpaError(f"unknown executor '{kind}' (choose from {', '.join(EXECUTORS)})")
