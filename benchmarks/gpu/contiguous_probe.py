"""Where the host time of the contiguous GPU request goes (a probe).

    python benchmarks/gpu/contiguous_probe.py     # on the GPU box, after setup.sh

The bench's contiguous case (1 -> 1, whole pages, consecutive blocks: 16 merged descriptors of
512 MiB) in two processes on one GPU: each request's ``pull()`` host time, then the same
requests under cProfile in the decode process (the top functions by own time), then one
request's trace spans (``~start-checks``, ``~start-choose``, ``pull``).
"""

from __future__ import annotations

import statistics
import sys
import time

from layoutc.compiler.api import compile_builtin
from layoutc.tools.bench.flows import run_request, start_workers
from layoutc.tools.bench.gpu import contiguous_setup


def main() -> int:
    deadline = time.monotonic() + 240
    workers = start_workers(["cuda", "cuda"], ["prefill", "decode"], deadline)
    try:
        params = dict(num_key_value_heads=4, head_dim=128, block_size=16)
        ep_kw = dict(timeout_s=60.0)
        names, dec, loc, rem, total = contiguous_setup(
            compile_builtin, workers, params, ep_kw, 8 << 30, "c", 1
        )
        strategy = sys.argv[1] if len(sys.argv) > 1 else "auto"
        calls, ts = [], []
        for i in range(8):
            t, infos = run_request(workers, names, f"w-{i}", dec, loc, rem, strategy, 60)
            if i >= 2:
                ts.append(t)
                calls.append(infos[0]["pull_call_s"])
        print(
            f"{total / 2**30:.1f} GiB, strategy {strategy}: request "
            f"{statistics.median(ts) * 1e3:.3f} ms, pull() {statistics.median(calls) * 1e3:.3f} ms"
        )
        workers[1].call("cprofile", True)
        for i in range(6):
            run_request(workers, names, f"p-{i}", dec, loc, rem, strategy, 60)
        print(workers[1].call("cprofile", False, 25))
        n = names[("decode", 0)][1]
        workers[1].call("trace", n, True)
        run_request(workers, names, "t-0", dec, loc, rem, strategy, 60)
        spans = workers[1].call("trace", n, False) or []
        t0 = min((b for _, b, _ in spans), default=0.0)
        for k, b, e in spans:
            print(f"  {(b - t0) * 1e3:8.3f} ms +{(e - b) * 1e3:7.3f} ms  {k}")
    finally:
        for w in workers:
            w.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
