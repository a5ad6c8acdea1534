"""Tiny-model tests run faster on one intra-op thread (thread start-up outweighs the tiny
matmuls, and CI machines are small); real-model tests keep torch's default."""

from __future__ import annotations

import pytest
import torch

_DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads(request):
    wanted = _DEFAULT_THREADS if request.node.get_closest_marker("real_model") else 1
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    yield


@pytest.fixture
def flower_task_identity():
    """Messages built outside a running Flower app need a run id."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 7, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
