"""``python -m bench [--quick] [--only SCENARIOS]``: run the benchmarks, print the table, write the results.

Writes ``bench/results/bench-<time>.json`` and ``.md`` (git-ignored), and for a complete default run also
``bench/RESULTS.md`` (committed: the latest full numbers).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from .report import console, markdown, write
from .run import SCENARIOS, Bench, Plan
from .wrk import wrk_path

_HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests: a minute or two instead of four to six")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning"],
        help="the gateway's log level; info (the default of x402-gateway serve) writes one access line per request",
    )
    parser.add_argument("--out", type=Path, default=_HERE / "results", help="folder for the JSON and Markdown")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    unknown = (only or set()) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    plan = Plan.quick() if args.quick else Plan()
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    bench = Bench(plan, log_level=args.log_level)
    print(f"{command.strip()}: results go to {args.out}", flush=True)
    if wrk_path() is None:
        print("wrk is not installed (apt-get install wrk): free-route rows use the Python load generator", flush=True)
    try:
        bench.run_all(only)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured", file=sys.stderr)
    seconds = time.monotonic() - started
    print()
    print(console(bench))
    json_path, md_path, doc = write(bench, args.out, command=command.strip(), seconds=seconds)
    print(f"\nwrote {json_path} and {md_path} ({seconds:.0f} s)")
    if only is None and not args.quick and args.log_level == "info":
        (_HERE / "RESULTS.md").write_text(markdown(bench, doc))
        print(f"wrote {_HERE / 'RESULTS.md'}")
    failed = [r for r in bench.rows if r.ok != r.requests]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
