#!/usr/bin/env bash
# Runs examples/sample.jsonl end to end on the running stack and prints the job summary.
set -euo pipefail
cd "$(dirname "$0")/.."
LLMBATCH=.venv/bin/llmbatch
start=$(date +%s.%N)
status_json=$($LLMBATCH submit examples/sample.jsonl --wait --json) || { echo "$status_json"; exit 1; }
end=$(date +%s.%N)
job=$(.venv/bin/python -c 'import json,sys; print(json.loads(sys.argv[1])["job_id"])' "$status_json")
mkdir -p var/demo
$LLMBATCH results "$job" -o "var/demo/$job.jsonl"
echo
$LLMBATCH status "$job"
.venv/bin/python - "$job" "$start" "$end" <<'PY'
import sys
import sqlalchemy as sa
from pipeline.stores import db
job, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
with db.get_engine().connect() as conn:
    n, tokens_in, tokens_out, cost = conn.execute(sa.text(
        "SELECT count(*), coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),"
        " coalesce(sum(cost_usd), 0) FROM results WHERE job_id = :j"), {"j": job}).one()
    rejected = conn.execute(sa.text(
        "SELECT line, reason FROM rejections WHERE job_id = :j ORDER BY line"), {"j": job}).all()
print(f"  results in Postgres: {n} rows, {tokens_in} input + {tokens_out} output tokens, cost ${cost}")
for line, reason in rejected:
    print(f"  rejected line {line}: {reason}")
print(f"  wall time: {end - start:.2f} s (submit to last result)")
print(f"  results file: var/demo/{job}.jsonl")
PY
