"""``specfed-flwr bench``'s command line. Imports nothing heavy at module level: ``specfed-flwr``
builds every sub-command's parser (``build_parser``) on each start."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings

DESCRIPTION = "``specfed-flwr bench``: every measurement of BENCHMARKS.md, side by side in one process."


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="specfed-flwr bench", description=DESCRIPTION)
    parser.add_argument("--quick", action="store_true", help="short preset (a few minutes on 2 CPU cores)")
    parser.add_argument("--out-dir", default="benchmarks", help="where results.json, analysis.json and the PNGs go")
    parser.add_argument("--markdown", default="BENCHMARKS.md", help="the report to regenerate")
    parser.add_argument("--tiny", action="store_true", help="tiny random models tiny:0/tiny:1, token-id prompts (tests)")
    parser.add_argument("--no-flower", action="store_true", help="skip the Flower simulation engine")
    parser.add_argument("--no-deployment", action="store_true",
                        help="skip the Flower deployment engine run (real SuperLink/SuperNodes/draft workers)")
    parser.add_argument("--no-federation", action="store_true",
                        help="skip the pipelined-engine comparison, emulated federation and step costs (bench.federation)")
    parser.add_argument("--device", default="auto", help="target device for the default pair (auto, cpu, cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; 1 for --tiny)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--render-from", default=None, help=argparse.SUPPRESS)  # rebuild report + plots from a saved state
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def _quiet() -> None:
    """Library warnings and transformers' chatter would bury the progress bar."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("specfed_flwr.bench").setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()


def run(args: argparse.Namespace) -> int:
    import torch

    from .output import render
    from .suite import Bench

    _quiet()
    torch.manual_seed(0)
    threads = getattr(args, "threads", None) or (1 if args.tiny else None)  # tiny models: threads only add overhead
    if threads:
        torch.set_num_threads(int(threads))
    if getattr(args, "render_from", None):
        render(Bench.from_state(args, args.render_from))
        return 0
    return Bench(args).run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
