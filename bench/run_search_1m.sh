#!/usr/bin/env bash
# The million-item search benchmark of docs/search.md, as one script (run it under the machine's heavy-job
# lock on a shared machine: flock /work/heavy.lock bash bench/run_search_1m.sh).
# Two workloads side by side, each with exact, Seismic (the defaults) and faiss IndexFlatIP-512, then
# the Seismic sweeps. WORK holds the generated collections and stores (about 20 GB at 1M); OUT the results.
set -euo pipefail
N=${N:-1000000}
Q=${Q:-500}
WORK=${WORK:-/tmp/lexvla-search-bench}
OUT=${OUT:-bench/results}
STATS=${STATS:-bench/results/vector_stats_embedded_top64.json}
PY=${PY:-python}
if [ "${PREPARE:-0}" = 1 ]; then  # generate both collections and their stores only (untimed), then stop
    $PY bench/search_bench.py --n-docs "$N" --n-queries "$Q" --workload zipf --work "$WORK" --prepare-only
    $PY bench/search_bench.py --n-docs "$N" --n-queries "$Q" --workload stats --stats "$STATS" --work "$WORK" --prepare-only
    exit 0
fi
uptime
$PY bench/search_bench.py --n-docs "$N" --n-queries "$Q" --single-queries 100 --workload zipf \
    --backends exact,seismic,faiss --profile-exact --work "$WORK" --out "$OUT/search_${N}_zipf.json"
$PY bench/search_bench.py --n-docs "$N" --n-queries "$Q" --single-queries 100 --workload stats --stats "$STATS" \
    --backends exact,seismic,faiss --profile-exact --work "$WORK" --out "$OUT/search_${N}_realistic.json"
$PY bench/seismic_sweep.py --n-docs "$N" --n-queries "$Q" --workload zipf --n-postings 50,200 \
    --query-cut 5,10,20 --heap-factor 0.9 --work "$WORK" --out "$OUT/seismic_sweep_${N}_zipf.json"
$PY bench/seismic_sweep.py --n-docs "$N" --n-queries "$Q" --workload stats --stats "$STATS" \
    --n-postings 400,1600 --query-cut 10,20,0 --heap-factor 0.9 --work "$WORK" \
    --out "$OUT/seismic_sweep_${N}_realistic.json"
uptime
