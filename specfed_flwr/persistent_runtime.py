"""A persistent device runtime for Flower's deployment engine: one warm ClientApp process.

Why it exists. A SuperNode hands every message to a NEW ``flwr-clientapp`` process (started by
``flower-superexec``), which exits after one task (``flwr/supernode/runtime/run_clientapp.py``).
That costs ~3 s of process start per message, and everything the ClientApp holds in memory --
for SpecFed the draft model and its per-sequence KV caches -- is lost after every round. Flower
tracks the missing feature as flwrlabs/flower#3670 (non-ephemeral ClientApp) and #5627 (app
scheduler); neither is merged.

What it does. ``specfed-flwr device-runtime --runtime-api-address HOST:PORT`` runs next to a
SuperNode started with ``--isolation process`` (Flower's mode for "someone else executes the
tasks") and takes the place of ``flower-superexec`` + ``flwr-clientapp``: it speaks their side of
the SuperNode's Runtime API in a loop, in ONE process:

1. ``AcquireTask`` (what ``flower-superexec`` polls; optional SuperExec HMAC auth), every
   ``poll_interval`` seconds while idle;
2. per task, with the task token (what ``flwr-clientapp`` does): ``PullTaskInput`` (context, run,
   FAB), ``PullMessages`` + object pulls (the message), a heartbeat thread, the ClientApp call,
   ``PushMessages`` + object pushes (the reply), ``PushTaskOutput`` (status and the updated context);
3. the ClientApp is loaded ONCE -- from ``--app module:attr`` (imported at start-up), or from the
   first FAB of each run like Flower does (``[tool.flwr.app.components] clientapp``) and cached --
   so module globals (``specfed_flwr.device.RUNTIME``: draft model, KV caches) live for every message.

It runs any ClientApp unmodified (``specfed_flwr.client_app:app`` or a user's). Differences from
the stock path, on purpose: the app is not re-imported for a new FAB of the same app (restart the
runtime to pick up new code; a warning says so), app dependencies are never installed at run time
(install them into this environment), a ClientApp exception becomes an error reply exactly like
Flower's (``CLIENT_APP_RAISED_EXCEPTION``, same reason format) and the runtime goes on with the next
message, and a lost SuperNode is waited for (the runtime reconnects when it is back).

Flower-internal modules it uses (not public API; 1.42.0 tested by running, 1.41.0's sources of
every module below are byte-identical to 1.42.0's), and why:

* ``flwr.supercore.runtime.RuntimeHttpClient`` -- the Runtime API's protobuf-over-HTTP client
  (the only client of that API; ``flower-superexec`` and ``flwr-clientapp`` use it);
* ``flwr.supercore.interceptors`` (``RuntimeVersionHttpInterceptor``, ``RuntimeTokenHttpInterceptor``,
  ``SuperExecAuthHttpInterceptor``) -- the version headers the SuperNode checks, the per-task token,
  the optional SuperExec HMAC on ``AcquireTask``;
* ``flwr.supercore.retry.RetryInvoker`` / ``exponential`` -- bounded retries of a task's calls.
  Flower's own ``make_simple_http_retry_invoker`` SIGINTs its process on HTTP 401, and Flower's
  task heartbeat SIGINTs it when a heartbeat is refused: right for a one-task process, fatal for a
  long-lived one, so neither is used;
* ``flwr.supercore.constant.TaskType`` -- the task type to acquire (``CLIENT_APP``);
* ``flwr.supercore.task_identity.TaskIdentity`` -- task ids Flower's logging/tracing reads;
* ``flwr.supercore.inflatable`` (``pull_and_inflate_object_from_tree``, ``make_pull_object_fn_protobuf``,
  ``make_confirm_message_received_fn_protobuf``) -- pulling a message's object tree; called with a
  5 ms initial backoff because the SuperNode creates a task before it has stored the message's
  objects (``supernode/start_client_internal.py``), and Flower's default 1 s backoff would be paid;
* ``flwr.supernode.runtime.run_clientapp`` (``push_message``, ``push_task_output``) -- the reply and
  task-output pushes, unchanged;
* ``flwr.common.serde`` (``context_from_proto``, ``run_from_proto``, ``fab_from_proto``),
  ``flwr.proto.runtime_pb2`` / ``node_pb2`` -- the wire messages;
* ``flwr.cli.install.install_from_fab``, ``flwr.clientapp.utils.get_load_client_app_fn`` -- installing
  a run's FAB and loading its ClientApp as ``flwr-clientapp`` does (FAB mode only).

:func:`check_flower_version` refuses a Flower outside :data:`TESTED_FLWR` (set
``SPECFED_ALLOW_UNTESTED_FLWR=1`` to try anyway, e.g. to run ``tests/test_persistent_runtime.py``
against a new release); :func:`internal_api_problems` checks every symbol and signature above and is
what that CI test asserts on, next to a real message round trip.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import flwr

log = logging.getLogger("specfed_flwr.runtime")

#: Flower releases this module is tested with (major, minor). Keep in step with pyproject.toml.
TESTED_FLWR: tuple[tuple[int, int], ...] = ((1, 41), (1, 42))
TESTED_FLWR_RANGE = ">=1.41,<1.43"
ALLOW_UNTESTED_ENV = "SPECFED_ALLOW_UNTESTED_FLWR"


class UnsupportedFlowerVersion(RuntimeError):
    """The installed Flower is outside the range this runtime was tested with."""


class RuntimeSetupError(ValueError):
    """A bad option (address, app reference, certificate path, ...): nothing was started."""


def check_flower_version(version: str | None = None) -> str:
    """Raise :class:`UnsupportedFlowerVersion` unless ``version`` (default: the installed
    ``flwr.__version__``) is a release in :data:`TESTED_FLWR`. The runtime talks to Flower-internal
    modules that may change in any release, so an untested one must fail loudly, not misbehave.
    Pre-releases of a tested minor (``1.42.1rc1``) pass; ``1.43.0.dev...`` does not."""
    version = flwr.__version__ if version is None else version
    m = re.match(r"^(\d+)\.(\d+)", str(version))
    if m and (int(m.group(1)), int(m.group(2))) in TESTED_FLWR:
        return version
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        log.warning("flwr %s is outside the tested range %s; running anyway (%s=1)", version,
                    TESTED_FLWR_RANGE, ALLOW_UNTESTED_ENV)
        return version
    raise UnsupportedFlowerVersion(
        f"specfed-flwr device-runtime uses Flower-internal modules and is tested with flwr{TESTED_FLWR_RANGE}, "
        f"but flwr {version} is installed. Install a tested Flower (pip install 'flwr[simulation]{TESTED_FLWR_RANGE}'), "
        f"or use the stock path (SuperNode without --isolation process, or `--runtime stock` in the launcher); "
        f"to try this Flower anyway set {ALLOW_UNTESTED_ENV}=1 and run tests/test_persistent_runtime.py first."
    )


try:  # every Flower-internal import in one place: a Flower that moved one fails here, by name
    import httpx
    from flwr.app import Context, Error, Message
    from flwr.cli.install import install_from_fab
    from flwr.clientapp import ClientApp
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import (
        HEARTBEAT_BASE_MULTIPLIER,
        HEARTBEAT_CALL_TIMEOUT,
        HEARTBEAT_DEFAULT_INTERVAL,
        ErrorCode,
        SubStatus,
    )
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        AcquireTaskRequest,
        PullAppMessagesRequest,
        PullTaskInputRequest,
        SendTaskHeartbeatRequest,
    )
    from flwr.supercore.constant import TaskType
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import RetryInvoker, exponential
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output
except ImportError as _exc:  # pragma: no cover - only with an incompatible Flower
    raise ImportError(
        f"specfed_flwr.persistent_runtime: a Flower-internal module it needs is missing in flwr "
        f"{getattr(flwr, '__version__', '?')} (tested with flwr{TESTED_FLWR_RANGE}): {_exc}. Use the stock "
        f"path (`--runtime stock`) or a tested Flower."
    ) from _exc

#: the Runtime API methods this runtime calls (checked by :func:`internal_api_problems`)
RUNTIME_METHODS = ("AcquireTask", "PullTaskInput", "PullMessages", "PullObject", "ConfirmMessageReceived",
                   "PushMessages", "PushObject", "PushTaskOutput", "SendTaskHeartbeat")

_RETRYABLE_STATUS = frozenset({502, 503, 504})
#: how long a task's Runtime API call is retried on transport errors / 502-504 before the task is given up
TASK_CALL_RETRY_S = 30.0
#: how long a task waits for its message to show up (the SuperNode creates the task first)
MESSAGE_WAIT_S = 15.0


def internal_api_problems() -> list[str]:
    """Every Flower-internal symbol, keyword and wire field this module relies on, checked against
    the installed Flower. Empty when all is there; each entry names what moved."""
    problems: list[str] = []

    def params(fn: Callable, *names: str) -> None:
        try:
            have = inspect.signature(fn).parameters
        except (TypeError, ValueError) as exc:
            problems.append(f"{getattr(fn, '__qualname__', fn)}: no signature ({exc})")
            return
        for name in names:
            if name not in have:
                problems.append(f"{fn.__module__}.{fn.__qualname__} has no parameter {name!r} "
                                f"(has {list(have)})")

    for method in RUNTIME_METHODS:
        if not callable(getattr(RuntimeHttpClient, method, None)):
            problems.append(f"RuntimeHttpClient.{method} is missing")
    params(RuntimeHttpClient.from_server_address, "server_address", "insecure", "root_certificates",
           "interceptors", "retry_invoker")
    params(pull_and_inflate_object_from_tree, "object_tree", "pull_object_fn", "confirm_object_received_fn",
           "return_type", "initial_backoff", "backoff_cap")
    params(make_pull_object_fn_protobuf, "pull_object_protobuf", "node", "run_id")
    params(make_confirm_message_received_fn_protobuf, "confirm_message_received_protobuf", "node", "run_id")
    params(push_message, "client", "message", "context")
    params(push_task_output, "client", "context", "sub_status", "details")
    params(install_from_fab, "fab_file", "skip_prompt")
    params(get_load_client_app_fn, "default_app_ref", "app_path", "multi_app")
    params(RetryInvoker, "wait_gen_factory", "recoverable_exceptions", "max_tries", "max_time", "should_giveup")
    params(RuntimeTokenHttpInterceptor, "token")
    params(RuntimeVersionHttpInterceptor, "component_name")
    params(SuperExecAuthHttpInterceptor, "master_secret", "protected_methods")
    if getattr(TaskType, "CLIENT_APP", None) != "flwr-clientapp":
        problems.append(f"TaskType.CLIENT_APP is {getattr(TaskType, 'CLIENT_APP', None)!r}, expected 'flwr-clientapp'")
    for attr in ("task_id", "run_id", "node_id"):  # settable properties of its metaclass
        prop = getattr(type(TaskIdentity), attr, None)
        if not (isinstance(prop, property) and prop.fset is not None):
            problems.append(f"TaskIdentity.{attr} is not a settable class property")
    for cls, attrs in ((SubStatus, ("COMPLETED", "FAILED")),
                       (ErrorCode, ("CLIENT_APP_RAISED_EXCEPTION", "LOAD_CLIENT_APP_EXCEPTION"))):
        for attr in attrs:
            if not hasattr(cls, attr):
                problems.append(f"{cls.__name__}.{attr} is missing")
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        AcquireTaskResponse,
        PullAppMessagesResponse,
        PullTaskInputResponse,
        SendTaskHeartbeatResponse,
    )

    for msg, fields in ((AcquireTaskRequest, ("supported_task_types",)), (AcquireTaskResponse, ("task", "token")),
                        (PullTaskInputResponse, ("context", "run", "fab", "task_id")),
                        (PullAppMessagesResponse, ("messages_list", "message_object_trees")),
                        (SendTaskHeartbeatResponse, ("success",))):
        have = set(msg.DESCRIPTOR.fields_by_name)
        for f in fields:
            if f not in have:
                problems.append(f"{msg.DESCRIPTOR.full_name} has no field {f!r} (has {sorted(have)})")
    return problems


# ------------------------------------------------------------------------------------- helpers


def _check_address(address: str) -> str:
    """``host:port`` with a port in 1..65535 (IPv6 as ``[::1]:9094``)."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", str(address).strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise RuntimeSetupError(f"--runtime-api-address must be HOST:PORT (the SuperNode's --host/--port, "
                                f"default 127.0.0.1:9094), got {address!r}")
    return str(address).strip()


def _load_app_ref(ref: str) -> ClientApp:
    """Import ``module:attr`` (dotted attributes allowed) and check that it is a ClientApp."""
    import importlib

    m = re.fullmatch(r"([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)", str(ref).strip())
    if not m:
        raise RuntimeSetupError(f"--app must be MODULE:ATTRIBUTE, e.g. specfed_flwr.client_app:app, got {ref!r}")
    try:
        obj: Any = importlib.import_module(m.group(1))
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise RuntimeSetupError(f"--app {ref}: cannot import {m.group(1)!r} ({type(exc).__name__}: {exc})") from None
    for part in m.group(2).split("."):
        if not hasattr(obj, part):
            raise RuntimeSetupError(f"--app {ref}: {m.group(1)!r} has no attribute {m.group(2)!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, ClientApp):
        raise RuntimeSetupError(f"--app {ref} is a {type(obj).__name__}, not a flwr.clientapp.ClientApp")
    return obj


def _bounded_retry_invoker(max_time: float = TASK_CALL_RETRY_S) -> RetryInvoker:
    """Retry transport errors and 502/503/504 for ``max_time`` seconds, give up on anything else
    (the caller decides), and never signal this process (see the module docstring)."""

    def giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in _RETRYABLE_STATUS
        return False

    return RetryInvoker(lambda: exponential(base_delay=0.05, max_delay=2.0), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=max_time, should_giveup=giveup)


class _TaskHeartbeat:
    """Keeps one task's token alive while its ClientApp runs longer than the SuperNode's patience.

    The SuperNode expires a claimed task ``HEARTBEAT_DEFAULT_INTERVAL`` s after the claim (60 s once
    running) unless heartbeats arrive. A round's task takes well under that, so the first heartbeat
    is sent only after an interval (Flower's sends one immediately: an extra HTTP call per message).
    A refused heartbeat (the task expired or was revoked) is logged, not turned into SIGINT."""

    def __init__(self, client: RuntimeHttpClient) -> None:
        self._client = client
        self._stop = threading.Event()
        self.interval = (HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT) * HEARTBEAT_BASE_MULTIPLIER
        self._thread = threading.Thread(target=self._run, name="specfed-task-heartbeat", daemon=True)

    def __enter__(self) -> "_TaskHeartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_CALL_TIMEOUT + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success:
                    log.warning("the SuperNode refused a heartbeat for task %s: the task expired", TaskIdentity.task_id)
                    return
            except httpx.HTTPError as exc:
                log.debug("task heartbeat failed: %s", exc)


@dataclass
class TaskRecord:
    """One served task (what its log line reports)."""

    task_id: int
    run_id: int
    message_type: str
    status: str
    details: str
    pull_s: float
    app_s: float
    push_s: float
    #: parts of ``pull_s``: PullTaskInput (context, run, FAB), waiting for the SuperNode to store the
    #: message, pulling its objects; and the FAB's size (it comes with every task)
    input_s: float = 0.0
    wait_s: float = 0.0
    objects_s: float = 0.0
    fab_bytes: int = 0


# --------------------------------------------------------------------------------------- runtime


class PersistentRuntime:
    """Serves a SuperNode's ClientApp tasks in this process until stopped.

    ``runtime_api_address``: the SuperNode's Runtime API (its ``--host``/``--port``). ``app``: a
    ``module:attr`` ClientApp reference (imported now, used for every run) or None to load each
    run's ClientApp from its FAB (once per FAB). ``poll_interval``: AcquireTask poll while idle;
    the SuperNode itself checks for the reply every 0.5 s, so polling much faster than that only
    costs CPU. ``superexec_auth_secret``: the SuperNode's ``--superexec-auth-secret-file`` bytes.
    """

    def __init__(self, runtime_api_address: str, *, insecure: bool = True, root_certificates: bytes | None = None,
                 app: str | None = None, poll_interval: float = 0.05,
                 superexec_auth_secret: bytes | None = None) -> None:
        check_flower_version()
        self.address = _check_address(runtime_api_address)
        if not (poll_interval > 0 and poll_interval <= 60):
            raise RuntimeSetupError(f"poll interval must be in (0, 60] seconds, got {poll_interval!r}")
        if insecure and root_certificates is not None:
            raise RuntimeSetupError("--insecure disables TLS; do not also give --root-certificates")
        self.insecure = insecure
        self.root_certificates = root_certificates
        self.poll_interval = float(poll_interval)
        self.app_ref = app
        self._fixed_app = _load_app_ref(app) if app else None
        self._fab_apps: dict[str, ClientApp] = {}
        self.tasks_done = 0
        self.stop_event = threading.Event()
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if superexec_auth_secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=superexec_auth_secret,
                                                             protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
        self._exec_client = self._client(interceptors, retry=None)

    def _client(self, interceptors: list[Any], retry: RetryInvoker | None) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(server_address=self.address, insecure=self.insecure,
                                                     root_certificates=self.root_certificates,
                                                     interceptors=interceptors, retry_invoker=retry)

    # -- the loop ------------------------------------------------------------------------------
    def serve(self, max_tasks: int | None = None) -> int:
        """Acquire and run tasks until :attr:`stop_event` is set (or ``max_tasks`` were served).
        Returns the number of tasks served. A SuperNode that is not (yet, or no longer) reachable is
        waited for; an authentication refusal ends the loop with :class:`RuntimeSetupError`."""
        from .records import DEVICE_RUNTIME_ENV

        os.environ[DEVICE_RUNTIME_ENV] = "persistent"  # the ClientApp's handshake reports it (standby messages)
        log.info("device runtime (pid %d) serving the Runtime API at %s, ClientApp %s, poll %.3f s",
                 os.getpid(), self.address, self.app_ref or "from each run's FAB", self.poll_interval)
        unreachable_since: float | None = None
        last_warned = 0.0
        try:
            while not self.stop_event.is_set() and (max_tasks is None or self.tasks_done < max_tasks):
                try:
                    res = self._exec_client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except httpx.TransportError as exc:
                    now = time.monotonic()
                    if unreachable_since is None:
                        unreachable_since = now
                    if now - last_warned >= 30.0:
                        last_warned = now
                        log.warning("no SuperNode Runtime API at %s (%s): waiting for it (started with "
                                    "--isolation process and --port matching?)", self.address, type(exc).__name__)
                    self.stop_event.wait(min(1.0, 10 * self.poll_interval))
                    continue
                except httpx.HTTPStatusError as exc:
                    code = exc.response.status_code
                    if code in (401, 403):
                        raise RuntimeSetupError(
                            f"the SuperNode at {self.address} refused AcquireTask (HTTP {code}): it expects SuperExec "
                            f"authentication; give the same --superexec-auth-secret-file as the SuperNode") from None
                    log.warning("AcquireTask failed (HTTP %d); retrying", code)
                    self.stop_event.wait(1.0)
                    continue
                if unreachable_since is not None:
                    log.info("SuperNode Runtime API at %s is reachable (after %.1f s)", self.address,
                             time.monotonic() - unreachable_since)
                    unreachable_since = None
                if not (res.HasField("task") and res.token):
                    self.stop_event.wait(self.poll_interval)
                    continue
                try:
                    self.run_task(res.task, res.token)
                except Exception:  # noqa: BLE001 - a bug in one task must not take the device offline
                    log.exception("task %s: unexpected error in the device runtime", res.task.task_id)
                self.tasks_done += 1
        finally:
            self._exec_client.close()
        return self.tasks_done

    def stop(self) -> None:
        self.stop_event.set()

    # -- one task ------------------------------------------------------------------------------
    def run_task(self, task: Any, token: str) -> TaskRecord:
        """What ``flwr-clientapp`` does for its one task, with the app already loaded. Never raises
        for a task-level problem: those become an error reply and/or a FAILED task output."""
        t0 = time.perf_counter()
        client = self._client([RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                               RuntimeTokenHttpInterceptor(token)], retry=_bounded_retry_invoker())
        context: Context | None = None
        message: Message | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed in the persistent device runtime"
        t_pulled = t_ran = t_pushed = t0
        self._pull_parts = (0.0, 0.0, 0.0, 0)
        try:
            with _TaskHeartbeat(client):
                try:
                    message, context, run, fab = self._pull_task_input(client)
                    t_pulled = time.perf_counter()
                    try:
                        app = self._app_for(run, fab)
                        reply = app(message=message, context=context)
                        status, details = SubStatus.COMPLETED, ""
                    except Exception as exc:  # the ClientApp's own failure: an error reply, like Flower's
                        code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
                        reason = str(type(exc)) + ":<'" + str(exc) + "'>"
                        if isinstance(exc, LoadClientAppError):
                            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                            reason = f"An exception was raised when attempting to load `ClientApp`: {exc}"
                        log.error("ClientApp raised an exception (task %s)", task.task_id, exc_info=exc)
                        reply = Message(Error(code=code, reason=reason), reply_to=message)
                        details = reason
                    t_ran = time.perf_counter()
                    push_message(client, reply, context)
                    t_pushed = time.perf_counter()
                except Exception as exc:  # the Runtime API side: the task is lost, the runtime goes on
                    status = SubStatus.FAILED
                    details = f"persistent device runtime: {type(exc).__name__}: {exc}"
                    log.error("task %s could not be served: %s", task.task_id, details)
        finally:
            try:  # Flower's push_task_output logs HTTP errors itself; nothing here may end the loop
                push_task_output(client=client, context=context, sub_status=status, details=details)
            except Exception as exc:  # noqa: BLE001
                log.error("task %s: pushing the task output failed (%s: %s)", task.task_id, type(exc).__name__, exc)
            client.close()
        t_end = time.perf_counter()
        record = TaskRecord(int(task.task_id), int(task.run_id),
                            message.metadata.message_type if message is not None else "?", str(status), details,
                            t_pulled - t0, t_ran - t_pulled, t_end - t_ran, *self._pull_parts)
        log.info("task %d (run %d, %s): %s in %.0f ms (pull %.0f = input %.0f + wait %.0f + objects %.0f, app %.0f, "
                 "push %.0f; FAB %d B)", record.task_id, record.run_id, record.message_type, record.status,
                 1000 * (t_end - t0), 1000 * record.pull_s, 1000 * record.input_s, 1000 * record.wait_s,
                 1000 * record.objects_s, 1000 * record.app_s, 1000 * record.push_s, record.fab_bytes)
        return record

    def _pull_task_input(self, client: RuntimeHttpClient):
        """``run_clientapp.pull_task_input``, tolerant of the window in which the SuperNode has created
        the task but not yet stored the message or its objects (``start_client_internal.py``: the
        task is created first): PullMessages is retried, object pulls back off from 5 ms (capped at
        20 ms), not Flower's 1 s."""
        t0 = time.perf_counter()
        res = client.PullTaskInput(PullTaskInputRequest())
        t_input = time.perf_counter()
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        deadline = time.monotonic() + MESSAGE_WAIT_S
        wait = 0.005
        while True:
            pulled = client.PullMessages(PullAppMessagesRequest())
            if pulled.messages_list:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no message for task {res.task_id} within {MESSAGE_WAIT_S:g} s")
            time.sleep(wait)
            wait = min(0.05, wait * 1.5)
        t_listed = time.perf_counter()
        node = Node(node_id=context.node_id)
        tree = pulled.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message,
            initial_backoff=0.005,
            backoff_cap=0.02,  # the SuperNode is still pulling them from the SuperLink: ask often, it is local
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower does: not part of the content
        self._pull_parts = (t_input - t0, t_listed - t_input, time.perf_counter() - t_listed, len(res.fab.content))
        return message, context, run, fab

    def _app_for(self, run: Any, fab: Any) -> ClientApp:
        """The fixed ``--app``, or the run's ClientApp loaded once per FAB hash. A second FAB whose
        ClientApp module is already imported gets the loaded module (Python caches it): that is what
        keeps the draft warm, and why new app code needs a runtime restart (warned once per FAB)."""
        if self._fixed_app is not None:
            return self._fixed_app
        key = fab.hash_str
        app = self._fab_apps.get(key)
        if app is None:
            install_from_fab(fab.content, skip_prompt=True)
            app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                run.fab_id, run.fab_version, fab.hash_str)
            if self._fab_apps and any(a is app for a in self._fab_apps.values()):
                log.warning("run %s brings a new FAB (%s) of an app this runtime already serves: its ClientApp "
                            "module stays the one loaded first (restart the device runtime to load new code)",
                            run.run_id, key[:12])
            self._fab_apps[key] = app
            log.info("ClientApp of %s==%s (FAB %s) loaded in pid %d", run.fab_id, run.fab_version, key[:12], os.getpid())
        return app


# ------------------------------------------------------------------------------------------- CLI


def main(args: Any) -> int:
    """``specfed-flwr device-runtime`` (its options are defined in ``cli.py``, which must not import
    Flower to build its parser). Runs until SIGTERM/SIGINT; exit code 0 after a clean stop, 2 for a
    bad option or an untested Flower."""
    import signal
    import sys

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("specfed_flwr").setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Runtime API poll otherwise
    try:
        if args.max_tasks is not None and args.max_tasks < 1:
            raise RuntimeSetupError(f"--max-tasks must be >= 1, got {args.max_tasks}")
        certs = None
        if args.root_certificates:
            path = Path(args.root_certificates).expanduser()
            if not path.is_file():
                raise RuntimeSetupError(f"--root-certificates {args.root_certificates}: no such file")
            certs = path.read_bytes()
        secret = None
        if args.superexec_auth_secret_file:
            path = Path(args.superexec_auth_secret_file).expanduser()
            if not path.is_file():
                raise RuntimeSetupError(f"--superexec-auth-secret-file {args.superexec_auth_secret_file}: no such file")
            secret = path.read_bytes()
            if not secret:
                raise RuntimeSetupError(f"--superexec-auth-secret-file {args.superexec_auth_secret_file} is empty")
        runtime = PersistentRuntime(args.runtime_api_address, insecure=bool(args.insecure), root_certificates=certs,
                                    app=args.app, poll_interval=args.poll_interval, superexec_auth_secret=secret)
    except (RuntimeSetupError, UnsupportedFlowerVersion) as exc:
        print(f"specfed-flwr device-runtime: {exc}", file=sys.stderr, flush=True)
        return 2

    def _terminate(signum, frame):  # noqa: ARG001 - unwind the loop (and a running task's finally)
        # once: the launcher signals the process group and the pid, and a second SystemExit would
        # land in the interpreter's atexit hooks (torch's) instead of the loop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    try:
        runtime.serve(max_tasks=args.max_tasks)
    except (SystemExit, KeyboardInterrupt):
        pass
    except RuntimeSetupError as exc:
        print(f"specfed-flwr device-runtime: {exc}", file=sys.stderr, flush=True)
        return 2
    log.info("device runtime (pid %d) stopped after %d task(s)", os.getpid(), runtime.tasks_done)
    return 0
