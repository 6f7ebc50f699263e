"""Start a fresh server on the demo model, benchmark it with a profile, stop it.

    python -m benchmarks.experiments.serve_and_bench [PROFILE] [--out DIR]
        [--server ours|vllm] [BENCH FLAGS]

What `make bench` runs. The server gets a free port and its own process
group (so its engine process is stopped with it), its log goes next to the
report, and it is stopped however the benchmark ends.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from benchmarks import cli
from benchmarks.experiments.local_servers import running_server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
        epilog="Any other flag goes to `codellama-serve bench run` (e.g. --rate 4 --duration 20).",
    )
    p.add_argument("profile", nargs="?", default="default")
    p.add_argument("--out", type=Path, help="report directory (default results/bench/<time>)")
    p.add_argument("--server", choices=["ours", "vllm"], default="ours")
    p.add_argument("--port", type=int, default=None)
    args, extra = p.parse_known_args(argv)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("results") / "bench" / stamp
    with running_server(args.server, out / "server.log", args.port) as server:
        code = cli.main(
            ["run", args.profile, "--base-url", server.base_url, "--out", str(out), *extra]
        )
    print(f"[serve_and_bench] report in {out}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
