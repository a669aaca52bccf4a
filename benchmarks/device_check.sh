#!/usr/bin/env bash
# The accelerator check, prepared to run as one command within 8 minutes on one GPU:
#
#   bash benchmarks/device_check.sh            # writes $OUT/device_check.json (OUT defaults to /tmp)
#   SMALL=1 bash benchmarks/device_check.sh    # tiny sizes: checks the script itself, on a CPU too
#                                              # (limits x LIMIT_SCALE, 6 by default with SMALL: a CPU
#                                              # compiles and inits the super-net far slower than a GPU)
#
# - the retraining step (benchmarks/bench_train_step.py) at the authors' retraining size: DARTS_V2,
#   C 36, 20 cells, batch 96, 32x32, against ../shared/bench/torch_darts_network.py, and the
#   MGAS-shaped network (per-op widths, weight masks); train and eval steps; float32, then bfloat16
#   (ours only: the reference runs float32);
# - the search step (benchmarks/bench_search_step.py) at the authors' small search size: the unpruned
#   8-cell super-net, C 24, batch 96, with search.programs = step / cell / edge, float32 and
#   bfloat16; the PyTorch yardstick once.
#
# Every command has its own time limit (they add up to 470 s), so one slow compile cannot eat the
# others' time; a command that fails or times out is recorded with its exit code and output tail,
# and the JSON is written whatever happens. Paste its figures into benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
PY=${PYTHON:-python3}
REF_DIR=${REF_DIR:-../shared/bench}
mkdir -p "$OUT/device_check"
LOG="$OUT/device_check"

if [[ "${SMALL:-0}" == 1 ]]; then
  LIMIT_SCALE=${LIMIT_SCALE:-6}
  TRAIN="--batch 8 --channels 8 --layers 5 --steps 2"
  SEARCH="--batch 4 --channels 4 --layers 3 --image 16 --steps 2"
else
  LIMIT_SCALE=${LIMIT_SCALE:-1}
  TRAIN="--batch 96 --channels 36 --layers 20 --steps 5"
  SEARCH="--batch 96 --channels 24 --layers 8 --steps 5"
fi

run() {  # run NAME SECONDS COMMAND...: output to $LOG/NAME.txt, exit code to $LOG/NAME.rc
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$LOG/$name.txt" 2>&1
  echo $? >"$LOG/$name.rc"
  echo "   rc $(cat "$LOG/$name.rc"), $((SECONDS - t0)) s"
  tail -n 4 "$LOG/$name.txt"
}

run train_f32 130 $PY benchmarks/bench_train_step.py $TRAIN --reference "$REF_DIR/torch_darts_network.py" \
  --json "$LOG/train_f32.json"
run train_bf16 60 $PY benchmarks/bench_train_step.py $TRAIN --dtype bfloat16 --nets darts_v2 --no-reference \
  --json "$LOG/train_bf16.json"
run search_step_f32 90 $PY benchmarks/bench_search_step.py $SEARCH --programs step
run search_cell_f32 45 $PY benchmarks/bench_search_step.py $SEARCH --programs cell --no-reference
run search_edge_f32 45 $PY benchmarks/bench_search_step.py $SEARCH --programs edge --no-reference
run search_step_bf16 40 $PY benchmarks/bench_search_step.py $SEARCH --programs step --dtype bfloat16 --no-reference
run search_cell_bf16 30 $PY benchmarks/bench_search_step.py $SEARCH --programs cell --dtype bfloat16 --no-reference
run search_edge_bf16 30 $PY benchmarks/bench_search_step.py $SEARCH --programs edge --dtype bfloat16 --no-reference

# One JSON: per command its exit code, every `name key=value ...` figure line it printed (parsed),
# the ratio lines, and the train benchmark's own JSON.
$PY - "$LOG" "$OUT/device_check.json" <<'EOF'
import glob, json, os, re, sys
log, out = sys.argv[1], sys.argv[2]
result = {}
for path in sorted(glob.glob(os.path.join(log, "*.rc"))):
    name = os.path.basename(path)[:-3]
    text = open(os.path.join(log, name + ".txt"), errors="replace").read()
    figures = [dict(name=line.split()[0], **dict(re.findall(r"(\w+)=(\S+)", line)))
               for line in text.splitlines() if re.match(r"^[\w-]+ (\w+=\S+ ?)+$", line)]
    entry = dict(rc=int(open(path).read()), figures=figures,
                 ratios=[line for line in text.splitlines() if "ratio" in line],
                 tail=text.splitlines()[-8:])
    own = os.path.join(log, name + ".json")
    if os.path.exists(own):
        entry["benchmark"] = json.load(open(own))
    result[name] = entry
json.dump(result, open(out, "w"), indent=1)
print(f"wrote {out}: " + ", ".join(f"{k} rc {v['rc']}" for k, v in result.items()))
EOF
