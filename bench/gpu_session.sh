#!/bin/bash
# A lent GPU's checks in one call (README "A real model on a GPU"):
#   1. sponlab installed from its wheel, as a user installs it (no DVC, no network there);
#   2. bench/gpu_smoke.py on the five tiny architectures, and the tiny DVC pipeline's 46 stage
#      commands twice (A, B) with base.device cuda in bf16 (bench/gpu_pipeline.py run), at once;
#   3. A vs B file by file (same command, same machine, same bytes);
#   4. bench/gpu_audit.py alone (Llama-3.2-1B and 3.1-8B shapes: time, peak memory, estimates).
# Prepare here:   .venv/bin/python bench/gpu_pipeline.py prepare --out .gpu
#                 (and once: echo /.gpu/ >> .git/info/exclude)
# Run there:      bash bench/gpu_session.sh .gpu        (device tool, carry [".gpu"], ~9 min)
# Results:        $OUT/gpu_session.tgz (./gpu_session.tgz where OUT is unset)
# On CPU, to try it: prepare with --device cpu --dtype bfloat16 into another folder, then
#   PY=.venv/bin/python DEVICE=cpu AUDIT_SHAPES=tiny PIPE_TIMEOUT=1200 bash bench/gpu_session.sh FOLDER
set -u
G=$(cd "${1:-.gpu}" && pwd)
R=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bfloat16}
AUDIT_SHAPES=${AUDIT_SHAPES:-llama-1b,llama-8b}
OUT=${OUT:-$PWD}; W=$(mktemp -d); L=$W/results; mkdir -p "$L"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s); since() { echo "$(( $(date +%s) - T0 ))s"; }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; nproc
  $PY -c "import sys, torch, transformers, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$L/machine.txt"
$PY -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$G"/whl/*.whl || exit 4
export PYTHONPATH=$W/site:$G/site

for x in A B; do  # the pipeline twice, at once, each level's stages 8 at a time
  cp -r "$G/tiny" "$W/tiny$x"
  ( cd "$W/tiny$x" && OMP_NUM_THREADS=1 timeout ${PIPE_TIMEOUT:-280} $PY "$R/bench/gpu_pipeline.py" run \
      --project . --commands "$G/tiny.tsv" --jobs 8 --device "$DEVICE" --dtype "$DTYPE" \
      --out "$L/tiny$x.json" > "$L/tiny$x.log" 2>&1; echo "tiny pipeline $x: rc $? at $(since)" ) &
done
for a in llama mistral qwen2 qwen3 gemma3; do
  ( timeout ${SMOKE_TIMEOUT:-150} $PY "$R/bench/gpu_smoke.py" --device "$DEVICE" --dtype "$DTYPE" --arch $a \
      --name "gpu_smoke_$a" > "$L/smoke_$a.log" 2>&1; echo "smoke $a: rc $?" ) &
done
wait
grep -h -E "^level|ok in|FAILED" "$L/tinyA.log" "$L/tinyB.log"
$PY "$R/bench/gpu_pipeline.py" compare "$W/tinyA" "$W/tinyB" > "$L/tiny_compare.json" 2>&1
cat "$L/tiny_compare.json"

timeout 330 $PY "$R/bench/gpu_audit.py" --device "$DEVICE" --dtype "$DTYPE" \
  --shapes "$AUDIT_SHAPES" --name gpu_audit > "$L/audit.log" 2>&1; echo "audit: rc $? at $(since)"
tr "\r" "\n" < "$L/audit.log" | grep -A60 "^model "
cp "$R"/bench/results/gpu_smoke_*.json "$R"/bench/results/gpu_audit.json "$L/" 2>/dev/null
tar czf "$OUT/gpu_session.tgz" -C "$W" results && echo "wrote $OUT/gpu_session.tgz at $(since)"
