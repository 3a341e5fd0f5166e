"""Load test of the runtime (layoutc.runtime.loadtest) on the built-in demo model.

python benchmarks/load_test.py --requests 1000 --json benchmarks/results/load-cpu.json
"""

from layoutc.compiler.api import compile_plan
from layoutc.compiler.cli_runtime import DEMO_SETS
from layoutc.compiler.pipeline import builtin_specs_dir
from layoutc.runtime.loadtest import main


def plan_for(prefill_tp: int, decode_tp: int):
    spec = str(builtin_specs_dir().joinpath("vllm_hybrid_mamba2.layout"))
    return compile_plan(spec, prefill_tp, decode_tp, dict(DEMO_SETS))


if __name__ == "__main__":
    raise SystemExit(main(plan_for))
