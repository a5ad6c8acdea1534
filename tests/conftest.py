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
