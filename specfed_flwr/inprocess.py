"""The whole protocol on one machine, without Flower: the in-process engine.

The server side is the same ``Coordinator`` and the same pipelined loop (``pipeline.run_rounds``)
as on Flower's engines; only the transport differs:

* ``ThreadTransport`` (default): each draft client on its own worker thread, so devices draft
  while the server verifies another cohort (torch releases the GIL inside its kernels);
* ``ProcessTransport``: the draft clients in a separate process, optionally pinned to their own
  CPUs (``os.sched_setaffinity``) -- an emulated federation in which the devices really have
  their own hardware, measured rather than modeled (``specfed-flwr bench``).
"""

from __future__ import annotations

import enum
import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .client_core import DraftClient
from .config import SpecFedConfig
from .coordinator import Coordinator
from .round_report import GenerationResult, RoundReport
from .pipeline import InFlight, run_rounds
from .protocol import DraftRequest, RoundPlan
from .target import TargetVerifier
from .tokens import decode_texts, default_eos_ids, encode_prompt
from .faults import Fault, FaultKind
from .wire import WireFormatError, decode_reply, reply_to_arrays


def pin_current_thread(cpus: Iterable[int] | None) -> None:
    """Run the calling thread (Linux: thread, not process) on ``cpus`` only; None leaves it."""
    if cpus is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(int(c) for c in cpus))


class _Completions:
    """A condition the main loop waits on until some device finished a request."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def notify(self) -> None:
        with self._cond:
            self._count += 1
            self._cond.notify_all()

    def wait(self, seen: int, seconds: float) -> int:
        with self._cond:
            if self._count == seen:
                self._cond.wait(seconds)
            return self._count


class ThreadTransport:
    """Each draft client on its own worker thread (its requests run in order, like one device)."""

    poll_interval = 0.05  # the most the loop waits; a finished request wakes it at once
    shares_server_cpus = True  # device threads run beside the server's (``target-steps-while-waiting``)

    def __init__(self, clients: Mapping[str, DraftClient], *, device_cpus: Iterable[int] | None = None):
        self.clients = dict(clients)
        cpus = list(device_cpus) if device_cpus is not None else None
        self._pools = {name: ThreadPoolExecutor(1, thread_name_prefix=f"device-{name}",
                                                initializer=pin_current_thread, initargs=(cpus,))
                       for name in self.clients}
        self._done = _Completions()
        self._seen = 0

    def _handle(self, name: str, request: DraftRequest):
        try:
            reply, metrics = self.clients[name].handle(request)
            return reply, metrics.as_dict(), time.perf_counter()
        finally:
            self._done.notify()

    def push(self, plan: RoundPlan, timeout: float) -> InFlight:
        now = time.perf_counter()
        flight = InFlight(plan, now, now + timeout, set(plan.requests))
        for name, request in plan.requests.items():
            flight.handles[name] = self._pools[name].submit(self._handle, name, request)
        return flight

    def pull(self, flights: list[InFlight]) -> None:
        for flight in flights:
            for name, future in flight.handles.items():
                if name not in flight.raw and future.done():
                    flight.raw[name] = future
                    flight.arrivals[name] = future.result()[2] if future.exception() is None else time.perf_counter()

    def decode(self, flight: InFlight):
        replies, metrics, faults = {}, {}, {}
        for name in flight.plan.requests:
            future: Future | None = flight.raw.get(name)
            if future is None:
                faults[name] = Fault(FaultKind.DEADLINE, "no reply within the round deadline")
                continue
            exc = future.exception()
            if exc is not None:  # a broken drafter must not end the run
                faults[name] = Fault(FaultKind.ERROR_REPLY, f"error reply from the device: {type(exc).__name__}: {exc}")
                continue
            replies[name], metrics[name], _ = future.result()
        return replies, metrics, faults

    def wait(self, seconds: float) -> None:
        self._seen = self._done.wait(self._seen, seconds)

    def close(self) -> None:
        for client in self.clients.values():
            client.stop_ahead()
        for pool in self._pools.values():
            pool.shutdown(wait=True)


@dataclass(frozen=True)
class WorkerRequest:
    """Server -> device process: one client's draft request (``DraftRequest.arrays()`` / ``config()``)."""

    client: str
    arrays: dict[str, Any]
    config: dict[str, Any]


@dataclass(frozen=True)
class WorkerReply:
    """Device process -> server: one client's reply arrays and metrics, or the error it raised
    (``error``; the server records it as that client's ``error-reply`` fault)."""

    client: str
    arrays: dict[str, Any] | None
    metrics: dict[str, Any] | None
    error: str | None = None


class WorkerControl(str, enum.Enum):
    """Control messages of the device process: READY (sent once, with its pid, after the draft
    loaded), RESET (forget every sequence before a new run; echoed back), STOP (exit)."""

    READY = "ready"
    RESET = "reset"
    STOP = "stop"


@dataclass(frozen=True)
class WorkerStatus:
    """The device process's answer to a control message: which one, and its pid."""

    control: WorkerControl
    pid: int


def _device_process(conn, names: list[str], settings: dict[str, Any], cpus: list[int] | None, threads: int) -> None:
    """A device process: load the draft once (``device.DeviceRuntime``), then serve requests."""
    if cpus is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))
    torch.set_num_threads(max(1, int(threads)))
    from .device import DeviceRuntime

    runtime = DeviceRuntime()
    try:
        for name in names:
            runtime.handshake(("local", name), settings)
        conn.send(WorkerStatus(WorkerControl.READY, os.getpid()))
        while True:
            message = conn.recv()
            if message == WorkerControl.STOP:
                break
            if message == WorkerControl.RESET:  # a new run: sequence ids start again, so no state may survive
                runtime.stop_drafting_ahead()
                for name in names:
                    runtime.handshake(("local", name), settings)
                conn.send(WorkerStatus(WorkerControl.RESET, os.getpid()))
                continue
            try:
                request = DraftRequest.from_parts(message.arrays, message.config)
                reply, metrics = runtime.draft(("local", message.client), settings, request)
                conn.send(WorkerReply(message.client, reply_to_arrays(reply), metrics))
            except Exception as exc:  # noqa: BLE001 - becomes this client's fault on the server
                conn.send(WorkerReply(message.client, None, None, f"{type(exc).__name__}: {exc}"))
    finally:
        runtime.stop_drafting_ahead()
        conn.close()


class ProcessTransport:
    """Draft clients in one separate process (spawned; the draft is loaded there by spec).

    ``device_cpus`` pins that process; ``threads`` is its torch thread count."""

    poll_interval = 0.05

    @property
    def shares_server_cpus(self) -> bool:
        """Whether the device process may run on a CPU this (server) thread may run on: unpinned,
        or pinned to CPUs that overlap the caller's (``target-steps-while-waiting``)."""
        if self._device_cpus is None or not hasattr(os, "sched_getaffinity"):
            return True
        return bool(set(os.sched_getaffinity(0)) & set(self._device_cpus))

    def __init__(self, names: Sequence[str], settings: Mapping[str, Any], *, vocab_size: int,
                 limits: SpecFedConfig | None = None, device_cpus: Iterable[int] | None = None, threads: int = 1,
                 start_timeout: float = 600.0):
        self.names = list(names)
        self.vocab_size = int(vocab_size)
        self.limits = limits or SpecFedConfig()  # the reply limits every decoded reply is held to
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        cpus = list(device_cpus) if device_cpus is not None else None
        self._device_cpus = cpus
        self._proc = ctx.Process(target=_device_process, args=(child, self.names, dict(settings), cpus, threads),
                                 name="specfed-device", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(start_timeout):
            self.close()
            raise RuntimeError(f"the device process did not start within {start_timeout:g} s")
        status: WorkerStatus = self._conn.recv()
        self.pid = status.pid
        self._queue: list[tuple[int, str]] = []  # (round, client) in the order sent: the process answers in order
        self._flights: dict[int, InFlight] = {}

    def reset(self) -> None:
        """Forget every sequence on the device side (called before each run)."""
        self._conn.send(WorkerControl.RESET)
        while True:  # replies of rounds a previous run left in flight come first
            message = self._conn.recv()
            if isinstance(message, WorkerStatus) and message.control == WorkerControl.RESET:
                break
        self._queue.clear()
        self._flights.clear()

    def push(self, plan: RoundPlan, timeout: float) -> InFlight:
        now = time.perf_counter()
        flight = InFlight(plan, now, now + timeout, set(plan.requests))
        self._flights[plan.round] = flight
        for name, request in plan.requests.items():
            self._conn.send(WorkerRequest(name, request.arrays(), request.config()))
            self._queue.append((plan.round, name))
        return flight

    def pull(self, flights: list[InFlight]) -> None:
        while self._queue and self._conn.poll():
            reply: WorkerReply = self._conn.recv()
            round_, expected = self._queue.pop(0)
            flight = self._flights.get(round_)
            if flight is None:
                continue
            flight.raw[expected] = reply
            flight.arrivals[expected] = time.perf_counter()

    def discard(self, flight: InFlight) -> None:
        """Stop collecting a round nobody will decode (its late replies are read and dropped)."""
        self._flights.pop(flight.plan.round, None)

    def decode(self, flight: InFlight):
        self._flights.pop(flight.plan.round, None)
        replies, metrics, faults = {}, {}, {}
        for name in flight.plan.requests:
            raw = flight.raw.get(name)
            if raw is None:
                faults[name] = Fault(FaultKind.DEADLINE, "no reply within the round deadline")
                continue
            if raw.error is not None:
                faults[name] = Fault(FaultKind.ERROR_REPLY, f"error reply from the device: {raw.error}")
                continue
            try:
                replies[name] = decode_reply(raw.arrays, vocab_size=self.vocab_size, max_k=self.limits.max_k,
                                             max_gamma=self.limits.max_gamma, max_bytes=self.limits.max_reply_bytes,
                                             client=f"device {name}")
                metrics[name] = dict(raw.metrics or {})
            except WireFormatError as exc:
                faults[name] = Fault.from_exception(exc)
        return replies, metrics, faults

    def wait(self, seconds: float) -> None:
        self._conn.poll(seconds)

    def close(self) -> None:
        try:
            self._conn.send(WorkerControl.STOP)
        except (OSError, BrokenPipeError):
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._conn.close()


class InProcessEngine:
    """The whole protocol on one machine: N local draft clients, no Flower.

    ``transport`` (optional) replaces the default worker threads, e.g. a ``ProcessTransport``
    whose devices run in their own process; its client names are then the drafters."""

    def __init__(
        self,
        target_model: torch.nn.Module,
        draft_models: Sequence[torch.nn.Module],
        config: SpecFedConfig | None = None,
        *,
        tokenizer: Any = None,
        eos_token_ids: Iterable[int] | None = None,
        clients: dict[str, DraftClient] | None = None,
        transport: Any = None,
        vocab_size: int | None = None,
    ):
        """``vocab_size``: the shared token ids (default: the tokenizer's, capped by the target's
        output rows; without a tokenizer every output row). Padding rows of either model's head
        beyond it are kept out of every distribution."""
        from .models import token_vocab_size
        from .proposer import HFDraftProposer

        self.config = config or SpecFedConfig()
        self.tokenizer = tokenizer
        self.target = TargetVerifier(target_model, vocab_size=vocab_size or token_vocab_size(target_model, tokenizer),
                                     numerics=self.config.verify_numerics)
        self.clients: dict[str, DraftClient] = dict(clients or {})
        for i, model in enumerate(draft_models):
            self.clients[f"drafter-{i}"] = DraftClient(
                HFDraftProposer(model, vocab_size=self.target.vocab_size),
                max_k=self.config.max_k,
                max_gamma=self.config.max_gamma,
                draft_ahead=self.config.draft_ahead,
            )
        self.transport = transport
        if eos_token_ids is None:
            eos_token_ids = default_eos_ids(target_model, tokenizer)
        self.eos_token_ids = list(eos_token_ids)

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int | None = None,
        owners: Sequence[str] | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        options: Sequence[Mapping[str, Any]] | None = None,
    ) -> GenerationResult:
        """``options[i]``: prompt i's overrides (``max_new_tokens``, ``stop``; see ``prompts.prompt_options``)."""
        coordinator = Coordinator(self.target, self.config, eos_token_ids=self.eos_token_ids, tokenizer=self.tokenizer)
        for i, prompt in enumerate(prompts):
            text = prompt if isinstance(prompt, str) else None
            ids = encode_prompt(self.tokenizer, prompt, self.config.chat_template)
            own = dict(options[i]) if options else {}
            coordinator.submit(
                ids, index=i, max_new_tokens=own.get("max_new_tokens", max_new_tokens),
                owner=owners[i] if owners else None, prompt=text, stop=own.get("stop"),
                temperature=own.get("temperature"), top_p=own.get("top_p"), seed=own.get("seed"),
            )
        transport = self.transport or ThreadTransport(self.clients)
        if self.transport is not None and hasattr(transport, "reset"):
            transport.reset()
        names = list(self.clients) if self.transport is None else list(getattr(self.transport, "names", self.clients))
        started = time.perf_counter()
        try:
            run_rounds(coordinator, transport, names, depth=self.config.depth(),
                       round_timeout=self.config.round_timeout, max_rounds=self.config.max_rounds,
                       after_round=(lambda report, flight, metrics: on_round(report)) if on_round else None)
        finally:
            if self.transport is None:
                transport.close()
        wall = time.perf_counter() - started
        results = sorted(coordinator.finished, key=lambda r: r.index)
        decode_texts(self.tokenizer, results)
        return GenerationResult(results, coordinator.summary(wall), coordinator.rounds)
