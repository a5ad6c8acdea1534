"""The names the package's older imports use (``from specfed_flwr.engine import Coordinator``).

The server side lives in one module per idea: ``coordinator.py`` (``Coordinator``: plan and
complete rounds), ``round_steps.py`` (the steps of one round), ``cohorts.py`` (cohorts and
admission), ``round_report.py`` (sequence, round and client records) and ``summary.py`` (the
run's numbers). Kept only for the tooling modules being split on another branch (``bench.py``
patches ``engine.Coordinator``); new code imports from those modules.
"""

from .coordinator import Coordinator
from .round_report import LIMITS, ClientStats, GenerationResult, RoundReport, SequenceResult
from .summary import summarize

__all__ = ["Coordinator", "ClientStats", "GenerationResult", "LIMITS", "RoundReport", "SequenceResult", "summarize"]
