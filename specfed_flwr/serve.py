"""What the ServerApp does, as a plain function: config -> target -> prompts -> strategy -> results."""

from __future__ import annotations

import logging
import time
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from flwr.common.logger import log
from flwr.serverapp import Grid

from .config import SpecFedConfig, load_config
from .tokens import default_eos_ids
from .prompts import load_prompts, prompt_options
from .report import summary_table
from .results import ResultsWriter
from .specs import load_target_spec
from .strategies import SpecFedResult, SpecFedStrategy
from .target import TargetVerifier

if TYPE_CHECKING:
    from .round_report import RoundReport

logging.getLogger("specfed_flwr").setLevel(logging.INFO)


def serve(
    grid: Grid, run_config: Mapping[str, Any] | SpecFedConfig, *, prompts: list[str] | list[list[int]] | None = None,
    on_round: "Callable[[RoundReport], None] | None" = None,
) -> SpecFedResult:
    """Prompts are texts (encoded with the target's tokenizer) or token-id lists; ``on_round`` gets
    every round's report as it is verified (the benchmark reads its timings from them)."""
    cfg = run_config if isinstance(run_config, SpecFedConfig) else load_config(run_config)
    prompt_list = prompts if prompts is not None else load_prompts(cfg.prompts)
    options = prompt_options(cfg.prompts) if prompts is None else [{} for _ in prompt_list]
    writer = ResultsWriter(cfg.results, resume=cfg.resume)
    todo = [(i, p) for i, p in enumerate(prompt_list) if not writer.is_done(i, p)]
    if len(todo) < len(prompt_list):
        log(INFO, "resuming: %d of %d prompts already in %s", len(prompt_list) - len(todo), len(prompt_list), cfg.results)
    if not todo and cfg.mode == "collaborative":
        # nothing left to generate: load nothing, keep the previous summary file
        log(INFO, "all %d prompts are already in %s: nothing to generate (set resume=false, or another "
            "results path, to generate again)", len(prompt_list), Path(cfg.results).resolve())
        return SpecFedResult(sequences=[], summary={"sequences": 0, "already_done": len(prompt_list)},
                             rounds=[], nodes={}, excluded={})
    started = time.perf_counter()
    loaded = load_target_spec(cfg.target, cfg.device, cfg.target_dtype, cfg.target_device_map)
    verifier = TargetVerifier(loaded.model, vocab_size=loaded.vocab_size, numerics=cfg.verify_numerics)
    if loaded.tokenizer is None and (cfg.stop_strings() or any(o.get("stop") for o in options)):
        # fail once, at start, rather than refusing every prompt in turn
        from .config import ConfigError

        raise ConfigError(f"config key 'stop': stop strings need the target's tokenizer; target {cfg.target!r} has none")
    log(INFO, "target %s on %s loaded in %.1f s", loaded.identity, verifier.device, time.perf_counter() - started)
    fingerprint = None
    if loaded.tokenizer is not None:
        from .device import tokenizer_identity

        fingerprint = tokenizer_identity(loaded.tokenizer, loaded.vocab_size)
    strategy = SpecFedStrategy(
        verifier,
        cfg,
        tokenizer=loaded.tokenizer,
        eos_token_ids=default_eos_ids(loaded.model, loaded.tokenizer),
        tokenizer_fingerprint=fingerprint,
        on_finished=writer.write,
        on_round=on_round,
    )
    result = strategy.generate(grid, [p for _, p in todo], indices=[i for i, _ in todo],
                               options={i: options[i] for i, _ in todo})
    result.summary["results_file"] = str(Path(cfg.results).resolve())
    result.summary["target_device"] = str(verifier.device)
    result.summary["config"] = cfg.as_dict()
    summary_path = write_summary(cfg.results, result.summary)
    log(INFO, "\n%s", summary_table(result.summary))
    log(INFO, "results written to %s (summary: %s)", Path(cfg.results).resolve(), summary_path)
    return result


def summary_path_for(results: str | Path) -> Path:
    path = Path(results)
    return path.with_name(path.stem + ".summary.json")


def write_summary(results: str | Path, summary: Mapping[str, Any]) -> Path:
    """The run's summary and effective config next to the results file (replaced per run)."""
    import json

    path = summary_path_for(results)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def make_server_app(
    overrides: Mapping[str, Any] | None = None,
    *,
    prompts: list[str] | list[list[int]] | None = None,
    on_result: "Callable[[SpecFedResult], None] | None" = None,
    on_round: "Callable[[RoundReport], None] | None" = None,
):
    """A ServerApp preconfigured with ``overrides`` (run config still wins), e.g. for
    ``flwr.simulation.run_simulation``, which passes no run config of its own."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context) -> None:
        merged = dict(overrides or {})
        merged.update(dict(context.run_config))
        result = serve(grid, merged, prompts=prompts, on_round=on_round)
        if on_result is not None:
            on_result(result)

    return app
