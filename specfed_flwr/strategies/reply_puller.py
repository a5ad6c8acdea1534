"""Pull replies from a deployment grid with one call in flight per node, off the decoding loop.

Why: Flower's ``Grid.pull_messages`` (flwr 1.42, ``superlink/grid/http_grid.py``) lists the
replies that arrived, then pulls each one's objects with exponential back-off (1 s, 2 s, 4 s, ...)
until they are stored. A SuperNode killed between pushing a reply and pushing its objects leaves
a reply whose objects never come: that one call then blocks for minutes (until the SuperLink
drops the upload session). With one call for every node's replies, the healthy nodes' replies
wait in the same call, their rounds pass their deadlines, and the healthy nodes get deselected
too (seen as 185 s rounds with a 15 s ``round-timeout``).

So each node's pending replies are pulled by their own call in a daemon thread; a node whose call
is still running gets no second one, and a blocked call costs only that node's replies. Threads
are daemons so that a call Flower keeps retrying never holds up the ServerApp's exit.
"""

from __future__ import annotations

import threading
from logging import WARNING
from typing import TYPE_CHECKING, Any

from flwr.common.logger import log

if TYPE_CHECKING:
    from flwr.serverapp import Grid

#: how long ``pull`` waits for the calls it has just started (a healthy call returns in
#: milliseconds; a blocked one is left running and collected by a later ``pull``)
SETTLE_S = 0.2


class _Call:
    """One ``pull_messages`` call running in a daemon thread."""

    def __init__(self, grid: "Grid", ids: list[str]):
        self.done = threading.Event()
        self.replies: list[Any] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(grid, ids), daemon=True, name="specfed-pull")
        self.thread.start()

    def _run(self, grid: "Grid", ids: list[str]) -> None:
        try:
            self.replies = list(grid.pull_messages(ids))
        except BaseException as exc:  # reported by ``ReplyPuller.pull``
            self.error = exc
        finally:
            self.done.set()


class ReplyPuller:
    """``pull({node: [message ids]})`` -> the replies that have arrived, one call per node at a time."""

    def __init__(self, grid: "Grid", settle_s: float = SETTLE_S):
        self.grid = grid
        self.settle_s = settle_s
        self.running: dict[str, _Call] = {}  # node -> its call in flight

    def pull(self, ids_by_node: dict[str, list[str]]) -> list[Any]:
        started = []
        for node, ids in ids_by_node.items():
            if ids and node not in self.running:
                self.running[node] = call = _Call(self.grid, list(ids))
                started.append(call)
        for call in started:  # give the calls just started time to return: normally milliseconds
            call.done.wait(self.settle_s)
        replies: list[Any] = []
        for node, call in list(self.running.items()):
            if not call.done.is_set():
                continue
            del self.running[node]
            if call.error is not None:  # a transport hiccup costs this poll, not the run
                log(WARNING, "pulling replies of node %s failed (%s: %s)", node, type(call.error).__name__,
                    call.error)
            replies.extend(call.replies)
        return replies
