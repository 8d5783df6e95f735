#!/usr/bin/env bash
# Everything worth running on a GPU, in one command that ends within seven minutes by its own clock:
#
#     bash benchmarks/run_all.sh OUT                      # env.txt, logs/, summary.md and every results file in OUT
#     bash benchmarks/run_all.sh OUT --archive FILE       # also keep FILE (OUT as a .tar.gz) current after each part
#     bash benchmarks/run_all.sh OUT --dry-run            # the same plan on a CPU, in under ten minutes
#
# The plan, its time limits and why they are shared as they are: benchmarks/run_all.py's docstring and plan().
# Runs from the checkout (nothing installed, no network) with python3 — or $PYTHON — with torch >= 2.11 and
# triton >= 3.6. Exits 0 once the summary is written: the parts' own results say what passed.
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks.run_all "$@"
