"""The names the package's older imports use (``from specfed_flwr.engine import Coordinator``).

The server side lives in one module per idea: ``coordinator.py`` (``Coordinator``: plan and
complete rounds), ``round_steps.py`` (the steps of one round), ``cohorts.py`` (cohorts and
admission), ``round_report.py`` (sequence, round and client records) and ``summary.py`` (the
run's numbers). New code imports from those modules.

Kept only for the tooling modules being split on another branch: ``bench.Probe`` times a round by
patching ``engine.Coordinator`` (the class itself, so that needs nothing) and
``engine.verify_greedy`` / ``verify_sampling`` / ``select_draft_path``, which the round's steps
now look up in ``round_steps``; assigning one of those here is forwarded there. Remove this module
once the probe patches ``round_steps`` directly.
"""

import sys
import types

from . import round_steps
from .coordinator import Coordinator
from .round_report import LIMITS, ClientStats, GenerationResult, RoundReport, SequenceResult
from .round_steps import select_draft_path, verify_greedy, verify_sampling
from .summary import summarize

_FORWARDED = ("select_draft_path", "verify_greedy", "verify_sampling")


class _ForwardingModule(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _FORWARDED:
            setattr(round_steps, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _ForwardingModule

__all__ = ["Coordinator", "ClientStats", "GenerationResult", "LIMITS", "RoundReport", "SequenceResult", "summarize",
           "select_draft_path", "verify_greedy", "verify_sampling"]
