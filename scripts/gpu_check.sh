#!/usr/bin/env bash
# The first thing to run on a lent GPU, in one call: every CUDA path mm1 has, each step under its own
# timeout, in at most about 8 minutes, with a JSON summary at the end (and in $OUT/gpu_check.json when
# $OUT is set, else runs/gpu_check/gpu_check.json). Paste its output into the session's note.
#
#   bash scripts/gpu_check.sh            on a GPU machine
#   bash scripts/gpu_check.sh --dry-run  anywhere: each CUDA step says "skipped: no CUDA", the rest runs
#                                        (CI runs this through tests/test_gpu_check.py)
#
# Steps: the environment (torch, CUDA, GPU); the GPU tests (tests/test_gpu.py); tiny training in fp32
# and bf16 (tokens/s, MFU, losses within a stated tolerance of each other); tiny with flex attention
# and torch.compile (recompiles counted); the MoE benchmark (grouped GEMM against the per-expert
# loop), decoding and training benchmarks on CUDA; the ablation recipe (1.2B decoder) for a few bf16 steps
# with flex attention and compiled blocks, recompiles counted; one request to `mm1 serve` on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
WORK=$(mktemp -d)
OUTDIR=${OUT:-runs/gpu_check}
mkdir -p "$OUTDIR"
SUMMARY="$WORK/summary.jsonl"
HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[ "$DRY" = 1 ] && HAS_CUDA=0

record() {  # name, status, seconds, detail
    $PY - "$1" "$2" "$3" "$4" >> "$SUMMARY" <<'EOF'
import json, sys
print(json.dumps({"step": sys.argv[1], "status": sys.argv[2], "seconds": float(sys.argv[3]), "detail": sys.argv[4][-2000:]}))
EOF
}

step() {  # name, timeout seconds, needs_cuda (0/1), command...
    local name=$1 limit=$2 cuda=$3
    shift 3
    echo "=== $name"
    if [ "$cuda" = 1 ] && [ "$HAS_CUDA" = 0 ]; then
        echo "skipped: no CUDA"
        record "$name" "skipped: no CUDA" 0 ""
        return
    fi
    local t0 log status
    t0=$(date +%s.%N)
    log="$WORK/$name.log"
    timeout "$limit" "$@" > "$log" 2>&1
    local rc=$?
    tail -n 25 "$log"
    if [ $rc = 0 ]; then status=ok; elif [ $rc = 124 ]; then status="timed out after ${limit}s"; else status="failed (exit $rc)"; fi
    echo "--- $name: $status"
    record "$name" "$status" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')" "$(tail -n 15 "$log")"
}

TINY=(data.num_workers=0 train.logging.progress=false train.logging.tensorboard=false train.logging.every=5
      train.checkpoint.every=1000 "data.root=$WORK/world")

step environment 60 0 $PY -c "
import torch, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('cuda available', torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'gpu {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm {p.major}.{p.minor}')
print('bf16 supported', torch.cuda.is_available() and torch.cuda.is_bf16_supported())
print('grouped_mm', hasattr(torch, '_grouped_mm'))"
step world 120 0 $PY -m mm1 data synth --recipe tiny --out "$WORK/world" data.synth.captions=2000 \
    data.synth.interleaved=300 data.synth.text=300 data.synth.sft=200 data.synth.eval_scenes=20
step tokenizer 120 0 $PY -m mm1 data tokenizer --recipe tiny --root "$WORK/world"
step prepare 120 0 $PY -m mm1 data prepare --recipe tiny --stage pretrain "data.root=$WORK/world"
step gpu_tests 240 1 $PY -m pytest -q -x tests/test_gpu.py
step tiny_fp32 120 1 $PY -m mm1 train --recipe tiny --out "$WORK/fp32" train.steps=30 train.precision=fp32 "${TINY[@]}"
step tiny_bf16 120 1 $PY -m mm1 train --recipe tiny --out "$WORK/bf16" train.steps=30 train.precision=bf16 "${TINY[@]}"
step bf16_follows_fp32 30 1 $PY - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
rows = {k: [json.loads(l) for l in (Path(sys.argv[1]) / k / "metrics.jsonl").read_text().splitlines()] for k in ("fp32", "bf16")}
for k, r in rows.items():
    print(k, "last loss %.4f" % r[-1]["loss"], "tokens/s %.0f" % r[-1]["tokens_per_s"], "mfu %.3f" % r[-1]["mfu"])
a, b = rows["fp32"][-1]["loss"], rows["bf16"][-1]["loss"]
print("relative difference %.4f (tolerance 0.03)" % (abs(a - b) / a))
sys.exit(0 if abs(a - b) / a <= 0.03 else 1)
EOF
step tiny_flex_compile 240 1 env TORCH_LOGS=recompiles $PY -m mm1 train --recipe tiny --out "$WORK/flex" \
    train.steps=20 train.precision=bf16 train.compile=true "${TINY[@]}"
# the ablation recipe (ViT-L/14 at 336 px, C-Abstractor 144, a 1.2B decoder, 4096-token sequences) from random
# weights for a few steps: bf16, flex attention and compiled blocks at a size users train (its prepare runs on a CPU)
step ablation_prepare 180 0 $PY -m mm1 data prepare --recipe ablation --stage pretrain "data.root=$WORK/world"
step ablation_bf16_flex 300 1 env TORCH_LOGS=recompiles $PY -m mm1 train --recipe ablation --out "$WORK/ablation" \
    "${TINY[@]}" train.steps=6 train.batch_size=2 train.logging.every=1 train.precision=bf16 train.compile=true
step recompiles 10 1 $PY - "$WORK" <<'EOF2'
import sys
from pathlib import Path
for name in ("tiny_flex_compile", "ablation_bf16_flex"):  # TORCH_LOGS=recompiles writes one block per recompile
    log = Path(sys.argv[1]) / f"{name}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    print(f"{name}: {text.count('Recompiling function')} recompiles")
EOF2
step bench_moe 120 1 $PY benchmarks/bench_moe.py --repeats 5
step bench_decode 120 1 $PY benchmarks/bench_decode.py --repeats 3
step bench_train 120 1 $PY benchmarks/bench_train.py --world "$WORK/world" --repeats 2
step serve_one_request 120 1 $PY - "$WORK" <<'EOF'
import json, subprocess, sys, time, urllib.request
from pathlib import Path
run = Path(sys.argv[1]) / "bf16"
proc = subprocess.Popen([sys.executable, "-m", "mm1", "serve", "--checkpoint", str(run), "--port", "8765"])
try:
    for _ in range(120):
        try:
            urllib.request.urlopen("http://127.0.0.1:8765/health", timeout=1)
            break
        except OSError:
            time.sleep(1)
    body = json.dumps({"model": "x", "max_tokens": 8, "messages": [{"role": "user", "content": "a red circle"}]})
    req = urllib.request.Request("http://127.0.0.1:8765/v1/chat/completions", body.encode(),
                                 {"Content-Type": "application/json"})
    print(json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["message"])
finally:
    proc.terminate()
    proc.wait(timeout=20)
EOF

$PY - "$SUMMARY" "$OUTDIR/gpu_check.json" "$DRY" <<'EOF'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1])]
summary = {"dry_run": sys.argv[3] == "1", "steps": steps,
           "failed": [s["step"] for s in steps if not (s["status"] == "ok" or s["status"].startswith("skipped"))]}
open(sys.argv[2], "w").write(json.dumps(summary, indent=2) + "\n")
print("=== summary")
for s in steps:
    print(f"{s['step']:20s} {s['status']:28s} {s['seconds']:6.1f} s")
print(json.dumps({"failed": summary["failed"], "summary": sys.argv[2]}))
EOF
rm -rf "$WORK"
