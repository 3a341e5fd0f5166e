"""The bench's one-GPU scattered request under several settings, side by side (a tuning probe).

    PYTHONPATH=<dir holding layoutc> python benchmarks/gpu/scattered_variants.py OUT.json \
        'two:slots=2' 'four:slots=4' 'reader:slots=2,mover=reader' 'cold:slots=2,ahead=0' \
        'sleepy:slots=2,env=LAYOUTC_BENCH_POLL_SLEEP_US=30' 'prof:slots=2,cprofile=1'

Each variant ``label:key=value,...`` starts its own three worker processes (prefill rank 0,
decode ranks 0 and 1 on GPU 0, as ``layoutc bench --device cuda``) with ``env`` set for them,
an endpoint staging buffer of ``staging_mib`` (default 1024) MiB in ``slots`` slots
(default 2), ``mover`` (``staged_mover``), and runs one verified warm-up request, ``RUNS``
(default 9) timed pulls, then one traced request (a merged timeline of the three processes).
``ahead=0``: the prefill rank expects without its block ids (no packing ahead);
``cprofile=1``: the timed requests run under cProfile in every process (printed).
Fractions are against a torch copy of the same bytes, measured once in the first variant's
prefill process.  ``DEVICE=cpu MIB=8`` runs the same flow on host memory (a dry run).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from layoutc.compiler.api import compile_builtin
from layoutc.tools.bench.config import BenchConfig
from layoutc.tools.bench.flows import profile_staged, run_request, start_workers
from layoutc.tools.bench.gpu import gpu_scattered_setup


def _variant(spec: str) -> tuple[str, dict, dict]:
    label, _, rest = spec.partition(":")
    kw, env = {}, {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k == "env":
            ek, _, evv = v.partition("=")
            env[ek] = evv
        else:
            kw[k] = int(v) if v.isdigit() else v
    return label, kw, env


def _without_ids(send):
    def wrapped(cmd, *args, **kwargs):
        if cmd == "expect":
            kwargs["blocks"] = None
        return send(cmd, *args, **kwargs)

    return wrapped


def _workers(dev: str, env: dict) -> list:
    labels = ("prefill", "decode-0", "decode-1")
    return start_workers([dev] * 3, labels, time.monotonic() + 3600, env=env)


def main() -> None:
    out_path, specs = sys.argv[1], sys.argv[2:]
    runs = int(os.environ.get("RUNS", "9"))
    dev = os.environ.get("DEVICE", "cuda")
    mib = int(os.environ.get("MIB", "512"))
    cfg = BenchConfig(device=dev, gpu_bytes_per_decode_rank=mib << 20)
    params = dict(num_key_value_heads=4, head_dim=128, block_size=16)
    res: dict = {"variants": {}}
    t_copy = None
    for spec in specs:
        label, kw, env = _variant(spec)
        workers = _workers(dev, env)
        if kw.get("ahead", 1) == 0:  # prefill ranks expect without their ids
            for w in workers:
                w.send = _without_ids(w.send)
        try:
            ep_kw = dict(
                timeout_s=60.0,
                staging_bytes=kw.get("staging_mib", 1024) << 20,
                staging_slots=kw.get("slots", 2),
                **({"staged_mover": kw["mover"]} if "mover" in kw else {}),
            )
            case = gpu_scattered_setup(compile_builtin, cfg, workers, params, ep_kw, tag=label)
            names, dec, db, pb = case.names, case.dec, case.db, case.pb
            if t_copy is None:
                t_copy = statistics.median(workers[0].call("copy_rate", case.total, 9))
                res["copy_ms"] = round(t_copy * 1e3, 3)
            ts = []
            for i in range(runs + 1):
                if i == 1 and kw.get("cprofile"):
                    for w in workers:
                        w.call("cprofile", True)
                t, _ = run_request(workers, names, f"{label}-{i}", dec, db, pb, "auto", 60.0)
                if i == 0:  # warm-up: verified, not timed
                    for wi, ns in dec.items():
                        for nm in ns:
                            workers[wi].call("verify", nm, [0], db, {0: pb}, timeout=180)
                            workers[wi].call("zero", nm)
                else:
                    ts.append(t)
            if kw.get("cprofile"):
                for w in workers:
                    print(f"===== {label}: {w.label}\n{w.call('cprofile', False, 35)}")
            fr = sorted(t_copy / t for t in ts)
            res["variants"][label] = {
                "spec": spec,
                "fraction_median": round(statistics.median(fr), 4),
                "fraction_all": [round(x, 4) for x in fr],
                "request_ms_median": round(statistics.median(ts) * 1e3, 3),
                "profile": profile_staged(workers, names, dec, db, pb, rid=f"{label}-prof"),
            }
            print(
                label,
                res["variants"][label]["fraction_median"],
                res["variants"][label]["fraction_all"],
                flush=True,
            )
        except Exception as e:  # noqa: BLE001 - the next variant still runs
            res["variants"][label] = {"spec": spec, "error": f"{type(e).__name__}: {e}"}
            print(label, "FAILED", e, flush=True)
        finally:
            for w in workers:
                w.stop()
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
