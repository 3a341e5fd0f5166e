"""Load test of the runtime (:mod:`layoutc.tools.loadtest`) on the built-in demo model.

python benchmarks/load_test.py --requests 1000 --json benchmarks/results/load-cpu.json
"""

from layoutc.tools.loadtest import main

if __name__ == "__main__":
    raise SystemExit(main())
