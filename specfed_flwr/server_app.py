"""specfed-flwr ServerApp: read the run config, run SpecFedStrategy, write results.

The run config (``[tool.flwr.app.config]`` plus ``flwr run --run-config`` overrides) is
merged over ``conf/specfed.yaml`` and validated before any model loads.
"""

from __future__ import annotations

from logging import ERROR

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from .config import ConfigError, load_config
from .serve import serve

app = ServerApp()


class InvalidRunConfig(ValueError):
    """The run config cannot be used; the message is the one line Flower stores as the run's
    status details (``flwr ls``) and that ``specfed-flwr simulate`` prints."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = load_config(dict(context.run_config))
    except ConfigError as exc:
        log(ERROR, "specfed-flwr: invalid run config: %s", exc)
        raise InvalidRunConfig(f"specfed-flwr: invalid run config: {exc}") from None
    serve(grid, cfg)
