"""specfed-flwr ServerApp: read the run config, run SpecFedStrategy, write results.

The run config (``[tool.flwr.app.config]`` plus ``flwr run --run-config`` overrides) is
merged over ``conf/specfed.yaml`` and validated before any model loads.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .serve import serve

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, dict(context.run_config))
