"""``specfed-flwr`` console script.

Adding a command: write ``_add_<name>_args(parser)`` and ``_cmd_<name>(args) -> int`` and add
one line to ``_COMMANDS``. Import heavy modules (torch, transformers, flwr) inside the
``_cmd_`` function, never at module level, so that light commands such as ``theory`` stay fast.

Exit codes: 0 success, 2 bad usage or a bad value (the message on stderr names the flag).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable, NamedTuple, Sequence

PROG = "specfed-flwr"


# ---------------------------------------------------------------------------------------------
# argparse value types (ArgumentTypeError -> "argument --flag: <message>", exit code 2)
# ---------------------------------------------------------------------------------------------

def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _open_unit_interval(text: str) -> float:
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in the open interval (0, 1), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


# ---------------------------------------------------------------------------------------------
# theory
# ---------------------------------------------------------------------------------------------

def _add_theory_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alpha", type=_open_unit_interval, required=True,
                        help="acceptance rate alpha, in (0, 1)")
    parser.add_argument("--per-token-cost", type=_positive_float, required=True, metavar="A",
                        help="a: cost of one drafted position (draft compute + uplink bytes / bandwidth), > 0")
    parser.add_argument("--round-cost", type=_positive_float, required=True, metavar="B",
                        help="b: fixed cost of one round (verify + RTT + downlink + overhead), > 0; "
                             "target-only decoding costs b per token")
    parser.add_argument("--gamma-max", type=_positive_int, default=None, metavar="N",
                        help="largest draft length allowed for the integer optimum")


def _cmd_theory(args: argparse.Namespace) -> int:
    from specfed_flwr import theory

    alpha, a, b = args.alpha, args.per_token_cost, args.round_cost
    gamma_opt = theory.optimal_gamma(alpha, a, b)
    gamma_int = theory.best_integer_gamma(alpha, a, b, gamma_max=args.gamma_max)
    out = {
        "alpha": alpha,
        "per_token_cost": a,
        "round_cost": b,
        "gamma_max": args.gamma_max,
        "gamma_opt": gamma_opt,
        "gamma_best_int": gamma_int,
        "speedup": float(theory.speedup(alpha, gamma_int, a, b)),
        "speedup_at_gamma_opt": float(theory.speedup(alpha, gamma_opt, a, b)),
        "expected_tokens_per_step": float(theory.expected_tokens_per_step(alpha, gamma_int)),
    }
    print(json.dumps(out, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------
# run-config style overrides shared by generate / simulate
# ---------------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with the value read like Flower's run config (int, float, bool, or string)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key:
        raise argparse.ArgumentTypeError(f"missing key in {text!r}")
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "\"'":
        return key, raw[1:-1]
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


def _add_override_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", type=parse_override, action="append",
                        default=[], help="override a config key (see docs/CONFIG.md); repeatable")
    parser.add_argument("--config", metavar="YAML", default=None, help="YAML defaults instead of conf/specfed.yaml")


def _load_config_or_exit(args: argparse.Namespace):
    from specfed_flwr.config import ConfigError, load_config

    try:
        return load_config(dict(args.overrides), args.config)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return None


def _add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); default: the config's prompt set")
    parser.add_argument("--drafters", type=_positive_int, default=2, help="number of local draft clients (default 2)")
    parser.add_argument("--json", action="store_true", help="print the results and summary as JSON")
    _add_override_args(parser)


def _cmd_generate(args: argparse.Namespace) -> int:
    cfg = _load_config_or_exit(args)
    if cfg is None:
        return 2
    import logging

    from specfed_flwr.inprocess import InProcessEngine
    from specfed_flwr.tokens import default_eos_ids
    from specfed_flwr.prompts import load_prompts, prompt_options
    from specfed_flwr.report import summary_table
    from specfed_flwr.specs import load_draft_spec, load_target_spec

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        prompts = args.prompt or load_prompts(cfg.prompts)
        options = None if args.prompt else prompt_options(cfg.prompts)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    target = load_target_spec(cfg.target, cfg.device, cfg.target_dtype, cfg.target_device_map)
    draft = load_draft_spec(cfg.draft, cfg.draft_quantization)
    from specfed_flwr.models import VocabularyMismatchError, check_vocab_compatible

    try:  # at load, naming both models, rather than as faulty replies in every round
        vocab = check_vocab_compatible((target.model, target.tokenizer), (draft.model, draft.tokenizer),
                                       target_name=f"target {cfg.target!r}", draft_name=f"draft {cfg.draft!r}")
    except VocabularyMismatchError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    engine = InProcessEngine(target.model, [draft.model] * args.drafters, cfg, tokenizer=target.tokenizer,
                             eos_token_ids=default_eos_ids(target.model, target.tokenizer), vocab_size=vocab)
    result = engine.generate(prompts, options=options, on_round=lambda r: print(r.line(), file=sys.stderr))
    if args.json:
        print(json.dumps({"results": [s.as_record() for s in result.sequences], "summary": result.metrics}, indent=2, default=str))
    else:
        for seq in result.sequences:
            print(f"--- [{seq.index}] {seq.prompt!r}\n{seq.text}")
        print(summary_table(result.metrics))
    return 0


def _add_simulate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-supernodes", type=_positive_int, default=2, help="virtual SuperNodes (default 2)")
    parser.add_argument("--engine", choices=("flwr-run", "python"), default="flwr-run",
                        help="flwr-run: our own SuperLink + `flwr run` (default); python: in-process run_simulation")
    parser.add_argument("--app-dir", default=None, help="Flower app directory (default: this checkout)")
    parser.add_argument("--log-dir", default=None, help="where SuperLink logs go (default: a temp dir)")
    _add_override_args(parser)


def _cmd_simulate(args: argparse.Namespace) -> int:
    cfg = _load_config_or_exit(args)
    if cfg is None:
        return 2
    from specfed_flwr.simulate import simulate

    return simulate(cfg, dict(args.overrides), num_supernodes=args.num_supernodes, engine=args.engine,
                    app_dir=args.app_dir, log_dir=args.log_dir)


def _add_bench_args(parser: argparse.ArgumentParser) -> None:
    from specfed_flwr.bench.cli import build_parser

    build_parser(parser)


def _cmd_bench(args: argparse.Namespace) -> int:
    from specfed_flwr.bench.cli import run

    return run(args)


def _add_device_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Named like ``flower-superexec``'s options where they mean the same (see persistent_runtime.py)."""
    parser.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT",
                        help="the SuperNode's Runtime API (its --host/--port; default port 9094). The SuperNode "
                             "must run with --isolation process, so that it does not start its own flower-superexec")
    parser.add_argument("--app", default=None, metavar="MODULE:ATTR",
                        help="ClientApp to serve for every run, e.g. specfed_flwr.client_app:app (imported at "
                             "start); default: each run's ClientApp from its FAB, loaded once")
    parser.add_argument("--insecure", action="store_true",
                        help="plain HTTP to the Runtime API (loopback only); without it TLS is used")
    parser.add_argument("--root-certificates", default=None, metavar="PEM",
                        help="CA certificate of the Runtime API's TLS certificate (the SuperNode's --ssl-ca-certfile)")
    parser.add_argument("--superexec-auth-secret-file", default=None, metavar="FILE",
                        help="the SuperNode's --superexec-auth-secret-file (raw bytes), if it uses one")
    parser.add_argument("--poll-interval", type=_positive_float, default=0.05, metavar="S",
                        help="seconds between AcquireTask polls while idle (default 0.05; the SuperNode itself "
                             "checks for the reply only every 0.5 s)")
    parser.add_argument("--max-tasks", type=_positive_int, default=None, metavar="N",
                        help="exit after serving N tasks (default: run until SIGTERM)")


def _cmd_device_runtime(args: argparse.Namespace) -> int:
    from specfed_flwr.persistent_runtime import main as runtime_main

    return runtime_main(args)


# ---------------------------------------------------------------------------------------------
# registry and entry point
# ---------------------------------------------------------------------------------------------

class _Command(NamedTuple):
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# The one place where subcommands are registered.
_COMMANDS: tuple[_Command, ...] = (
    _Command("theory", "optimal draft length (Lambert W) and predicted speedup, as JSON",
             _add_theory_args, _cmd_theory),
    _Command("simulate", "run the Flower app on the simulation engine (the README's main job)",
             _add_simulate_args, _cmd_simulate),
    _Command("generate", "run the protocol in-process with local drafters (no Flower)",
             _add_generate_args, _cmd_generate),
    _Command("bench", "benchmark suite: writes benchmarks/results.json, BENCHMARKS.md and plots",
             _add_bench_args, _cmd_bench),
    _Command("device-runtime", "persistent ClientApp runtime next to a SuperNode started with --isolation process "
                               "(deployment engine): one process serves every message, so the draft model and KV "
                               "caches stay warm", _add_device_runtime_args, _cmd_device_runtime),
)


def _build_parser() -> argparse.ArgumentParser:
    from specfed_flwr import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Federated speculative LLM inference on Flower (top-K sparse drafts, "
                    "bias-aware aggregation, exact verification).",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in _COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_args(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    return int(run(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
