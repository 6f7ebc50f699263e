"""vLLM's own `bench serve`, unchanged, run from its module (the `vllm` console script of
the CPU build crashes, and `vllm.benchmarks.serve` has no `__main__`). Two wrappers only:
its `custom` dataset reads JSONL with pandas (not installed here), so rows are read with
json, in file order (from `--custom-offset`); and its client CPU time is printed.

    python -m benchmarks.experiments.vllm_bench --backend openai --base-url URL \\
        --endpoint /v1/completions --dataset-name custom --dataset-path prompts.jsonl ...
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

OFFSET_ENV = "VLLM_BENCH_CUSTOM_OFFSET"


def main(argv: list[str]) -> None:
    import vllm.benchmarks.serve as vs
    from vllm.benchmarks.datasets import datasets as vds
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    offset = int(os.environ.get(OFFSET_ENV, "0"))

    def _load(self: Any) -> None:
        with open(self.dataset_path, encoding="utf-8") as f:
            self.data = [json.loads(line) for line in f if line.strip()][offset:]

    vds.CustomDataset.load_data = _load
    orig = vs.benchmark

    async def timed(*a: Any, **k: Any) -> Any:
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return await orig(*a, **k)
        finally:
            cpu, wall = time.process_time() - c0, time.perf_counter() - w0
            print(f"[client cpu] {cpu:.2f} s over {wall:.1f} s")

    vs.benchmark = timed
    parser = FlexibleArgumentParser()
    vs.add_cli_args(parser)
    vs.main(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
