"""catkd's own console lines from Ray workers, printed by the driver without Ray's noise.

A quiet run (the default) connects with ``log_to_driver=False``: nothing Ray's
controller and workers print reaches the console (no ``(RayTrainWorker pid=...)``
prefixes, worker-group tables, or ``core_worker.cc`` lines a user reads as failures).
The lines meant for the user (progress within an epoch, one line per epoch, resumes)
travel instead through a ``Relay`` actor that the driver drains and prints as they
come. ``verbose=true`` keeps Ray's own output as well.

The relay is also where the driver notices a worker group that cannot start: when no
worker has spoken for ``WAITING_NOTE_S``, it says what the run asked for and what the
cluster has free, instead of Ray's repeated "Requesting resources" lines.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

WAITING_NOTE_S = 60.0  # silence from the workers before the driver says it is waiting for resources
POLL_S = 0.5


@ray.remote(num_cpus=0)
class _Lines:
    """Lines waiting to be printed, per run: one actor serves every run of a driver (a
    sweep's runs at once), so a training start costs no extra process."""

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = defaultdict(list)

    def put(self, run: str, line: str) -> None:
        self.lines[run].append(line)

    def take(self, run: str) -> list[str]:
        return self.lines.pop(run, [])


# By Ray job and the driver's node: a driver that reconnects gets a new one, also where
# it connects to another cluster, whose first job has the same id as the last one's had
# (a handle from the old cluster would crash Ray's core worker when sent).
_actors: dict[tuple[str, str], Any] = {}
_actors_lock = threading.Lock()


def _lines_actor() -> Any:
    context = ray.get_runtime_context()
    job = (context.get_job_id(), context.get_node_id())
    with _actors_lock:
        if job not in _actors:
            # On the driver's own node: the relay must outlive the loss of any worker node
            # (a training that recovers from a lost node would otherwise lose its console,
            # and its workers' next line would fail). A 0-CPU actor fits a 0-CPU head.
            here = NodeAffinitySchedulingStrategy(node_id=context.get_node_id(), soft=False)
            _actors[job] = _Lines.options(scheduling_strategy=here).remote()
        return _actors[job]


class Console:
    """What a worker prints through: the driver's relay, or (outside a relayed run)
    this process's own stdout. Picklable: it travels in the train loop's config."""

    def __init__(self, actor: Any = None, run: str = "") -> None:
        self.actor, self.run = actor, run

    def say(self, line: str) -> None:
        if self.actor is None:
            print(line, file=sys.__stdout__, flush=True)
            return
        try:
            # A round trip, so a line said just before a worker exits is not lost.
            ray.get(self.actor.put.remote(self.run, line))
        except RayActorError:
            # The driver (and its relay) is gone: a console line is never worth a training.
            # The line still reaches this worker's log.
            self.actor = None
            print(line, file=sys.__stdout__, flush=True)


class Relay:
    """Driver side: ``with Relay(waiting=...) as console:`` hands ``console`` to the
    workers and prints their lines until the block ends (then the last ones)."""

    def __init__(self, waiting: Callable[[], str] | None = None) -> None:
        self.waiting = waiting
        self._stop = threading.Event()
        self._spoke = time.monotonic()
        self._noted = False

    def __enter__(self) -> Console:
        self.actor, self.run = _lines_actor(), uuid.uuid4().hex
        self._thread = threading.Thread(target=self._pump, name="catkd-console", daemon=True)
        self._thread.start()
        return Console(self.actor, self.run)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._print(ray.get(self.actor.take.remote(self.run)))

    def _pump(self) -> None:
        while not self._stop.wait(POLL_S):
            self._print(ray.get(self.actor.take.remote(self.run)))
            if self.waiting and not self._noted and time.monotonic() - self._spoke > WAITING_NOTE_S:
                self._noted = True  # once: a cluster that autoscales may take minutes, one line says why
                self._write(self.waiting())

    def _print(self, lines: list[str]) -> None:
        if lines:
            self._spoke, self._noted = time.monotonic(), False
        for line in lines:
            self._write(line)

    def _write(self, line: str) -> None:
        print(line, flush=True)
