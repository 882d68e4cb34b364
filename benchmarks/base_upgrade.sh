#!/bin/bash
# Issue 11's measurement on the embedded suite (docs/registry.md, "Base upgrades"): a fresh demo,
# a new base (another seed, 10 epochs), `deltapatch base upgrade` on the stack's gpu pool while a
# client loops /predict, the predict CLI after the switch, then `deltapatch base rollback`.
#
#   benchmarks/base_upgrade.sh OUT_DIR [SEED]     # from the repository root, after `make setup`
#
# Prints a summary (and writes it to OUT_DIR/summary.txt); the upgrade's report, with the rebase's
# wall time against the sum of its trainings, is in OUT_DIR/upgrade.log.
set -u
OUT=$(realpath -m "$1"); SEED=${2:-1}; mkdir -p "$OUT"
REPO=$(pwd); B=$REPO/.venv/bin/deltapatch; PY=$REPO/.venv/bin/python
export OMP_NUM_THREADS=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1
P=$OUT/demo; S=$OUT/summary.txt; STOP=$OUT/stop; : > "$S"
say() { echo "$*" | tee -a "$S"; }
t0=$(date +%s); $B demo --project "$P" > "$OUT/demo.log" 2>&1; say "demo rc=$? s=$(( $(date +%s) - t0 ))"
mkdir -p "$OUT/newbase"
$PY - "$P/params.yaml" "$OUT/newbase/params.yaml" "$SEED" <<'PY'
import sys, yaml
params = yaml.safe_load(open(sys.argv[1]))
params["seed"], params["pretrain"]["epochs"] = int(sys.argv[3]), 10
params["base"]["weights"] = "models/base.safetensors"
yaml.safe_dump(params, open(sys.argv[2], "w"), sort_keys=False)
PY
t0=$(date +%s); (cd "$OUT/newbase" && $B pretrain > "$OUT/pretrain.log" 2>&1); say "new base (seed $SEED) rc=$? s=$(( $(date +%s) - t0 ))"
cd "$P"
image=$(find "$P/data/tasks/glyphs" -name '*.png' | sort | head -1)
$B predict --task glyphs "$image" --json > "$OUT/predict-before.json" 2>&1
$PY "$REPO/benchmarks/predict_loop.py" "$OUT/answers-before.json" "$STOP" --once > /dev/null
rm -f "$STOP"; $PY "$REPO/benchmarks/predict_loop.py" "$OUT/loop-upgrade.json" "$STOP" > "$OUT/loop-upgrade.txt" & LOOP=$!
t0=$(date +%s); $B base upgrade "$OUT/newbase/models/base.safetensors" > "$OUT/upgrade.log" 2>&1; say "upgrade rc=$? s=$(( $(date +%s) - t0 ))"
sleep 10; touch "$STOP"; wait $LOOP; say "client during the upgrade: $(cat "$OUT/loop-upgrade.txt")"
grep -a "wall time" "$OUT/upgrade.log" | tail -1 | tee -a "$S"
$B predict --task glyphs "$image" --json > "$OUT/predict-after.json" 2>&1
t0=$(date +%s); $B base rollback --reason "benchmarks/base_upgrade.sh" > "$OUT/rollback.log" 2>&1; say "rollback rc=$? s=$(( $(date +%s) - t0 ))"
sleep 5; $PY "$REPO/benchmarks/predict_loop.py" "$OUT/answers-rolledback.json" "$STOP" --once > /dev/null
$B predict --task glyphs "$image" --json > "$OUT/predict-rolledback.json" 2>&1
$PY - "$OUT" <<'PY' | tee -a "$S"
import json, sys
out = sys.argv[1]
same = lambda a, b: json.load(open(f"{out}/{a}"))["answers"] == json.load(open(f"{out}/{b}"))["answers"]
print("predict CLI version before/after/rolled back:",
      [json.load(open(f"{out}/predict-{s}.json"))[0]["version"] for s in ("before", "after", "rolledback")])
print("rolled-back /predict answers bit-identical to those before:", same("answers-before.json", "answers-rolledback.json"))
print("rolled-back predict CLI bit-identical:",
      json.load(open(f"{out}/predict-before.json")) == json.load(open(f"{out}/predict-rolledback.json")))
PY
$B stack down > /dev/null 2>&1
