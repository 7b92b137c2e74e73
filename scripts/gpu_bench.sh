if [ "${MPAFER_BENCH_SMALL:-0}" != 1 ] && [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; fi
# ^ first line on purpose: the GPU image lacks open_clip_torch, ftfy, wcwidth and pydantic; their wheels
#   travel in the git-ignored .whl/ folder.
#
# scripts/gpu_bench.sh — the one-shot GPU benchmark of MPA-FER (docs/PERFORMANCE.md, "GPU figures").
#
#   Fetch the wheels first (here): scripts/fetch_gpu_wheels.sh
#   On the device machine, from the repository root (carry [".whl"], timeout ~420 s):
#       bash scripts/gpu_bench.sh
#   Logic check on a CPU with tiny sizes (a minute or two):
#       PATH=$PWD/.venv/bin:$PATH MPAFER_BENCH_SMALL=1 OUT=/tmp/gpu-bench-small bash scripts/gpu_bench.sh
#
# Measures, for ViT-B-16 at 224 (random weights), 8 visual tokens at all 12 layers, 10 text context tokens,
# 7 classes, CGLA top-16 and all losses, bf16 autocast:
#   train-step at batch 256 compiled and eager, at batch 32 compiled (and with CUDA graphs), peak memory,
#   FLOPs/image and utilisation; a whole epoch of 12,271 JPEGs of 100x100 including data loading at batch
#   32 (-> the paper-protocol estimate: train.epochs = 120, the config default) and 256; evaluation images/s; the data paths alone;
#   eager with open_clip's own attention modules (A/B of the fused attention).
# Every benchmark runs under `timeout`, in priority order, and is skipped when the time budget
# (MPAFER_BENCH_BUDGET_S, default 290 s from the start) cannot fit it, so the script ends within ~5 min.
# Results: $OUT/bench.jsonl (one JSON line per benchmark, with "label", "rc", "wall_s"), $OUT/log.txt,
# $OUT/summary.txt (targets met or not), $OUT/profile_*.txt (torch.profiler top operators).
set -u
set -o pipefail

OUT="${OUT:-/tmp/mpafer-gpu-bench}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
JSONL="$OUT/bench.jsonl"
: > "$JSONL"
SMALL="${MPAFER_BENCH_SMALL:-0}"
BUDGET="${MPAFER_BENCH_BUDGET_S:-290}"
T0=$(( $(date +%s) - SECONDS ))  # the script's start (the install above included)
WORK="${MPAFER_BENCH_WORK:-/tmp/mpafer-bench-work}"
TMPD="$(mktemp -d /tmp/mpafer-bench-tmp.XXXXXX)"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
# one Inductor cache for all benchmarks: the epoch runs reuse the train-step graphs of the same shapes
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/mpafer-inductor-cache}"
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
# also set in code (mpafer.runtime.inductor_workarounds): torch 2.11's coalescing analysis asserts on this graph
export TORCHINDUCTOR_COALESCE_TILING_ANALYSIS=0

# the run is configured as for training (--set group.field=value); --classes etc. are the benchmark's own
if [ "$SMALL" = "1" ]; then
    DEVICE=cpu
    MODEL=(--set clip.model=mpafer-tiny --set train.device=cpu --set clip.device=cpu --set model.n_visual_tokens=2
           --set model.n_ctx=2 --set model.topk=4 --classes 7)
    COMPILE=(--set "train.compile='off'")
    EAGER=(--set "train.compile='off'")
    RO_MODE=()
    B_BIG=8; B_SMALL=4; STEPS_BIG=3; STEPS_SMALL=4; WARM=1
    N_EPOCH=64; N_DATA=48; EVAL_B=16; EVAL_STEPS=3; WORKERS=1
    DATA_SIZES="100,64"
else
    DEVICE=cuda
    MODEL=(--set clip.model=ViT-B-16 --set train.device=cuda --set clip.device=cuda --set model.n_visual_tokens=8
           --set model.n_ctx=10 --set model.topk=16 --classes 7)
    COMPILE=(--set "train.compile='on'")
    EAGER=(--set "train.compile='off'")
    RO_MODE=(--set "train.compile='on'" --set train.compile_mode=reduce-overhead)
    B_BIG=256; B_SMALL=32; STEPS_BIG=20; STEPS_SMALL=60; WARM=3
    N_EPOCH=12271; N_DATA=8192; EVAL_B=512; EVAL_STEPS=20; WORKERS=15
    DATA_SIZES="100,256"
fi

log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# bench LABEL CAP_S NEED_S ARGS... : run `python3 -m mpafer.cli bench ARGS` under timeout and append its line
bench() {
    local label="$1" cap="$2" need="$3"
    shift 3
    local left=$(( BUDGET - ($(date +%s) - T0) ))
    if [ "$left" -lt "$need" ]; then
        log "skip $label: ${left}s left, needs ${need}s"
        printf '{"label": "%s", "skipped": "time budget: %ss left, %ss needed"}\n' "$label" "$left" "$need" >> "$JSONL"
        return 0
    fi
    local limit=$(( cap < left ? cap : left ))
    log "=== $label (timeout ${limit}s): python3 -m mpafer.cli bench $*"
    local start
    start=$(date +%s)
    timeout -k 10 "$limit" python3 -m mpafer.cli bench "$@" 2>&1 | tee -a "$LOG" | grep '^{"bench"' > "$TMPD/line.json"
    local rcs=("${PIPESTATUS[@]}")
    local wall=$(( $(date +%s) - start ))
    python3 - "$label" "${rcs[0]}" "$wall" "$TMPD/line.json" >> "$JSONL" <<'PY'
import json, sys
label, rc, wall, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
text = open(path).read().strip().splitlines()
try:
    rec = json.loads(text[-1]) if text else None
except ValueError:
    rec = None
if rec is None:
    rec = {"error": "timeout" if rc in (124, 137) else "failed (see log.txt)"}
rec = {"label": label, "rc": rc, "wall_s": wall, **rec}
print(json.dumps(rec))
PY
    log "--- $label: rc ${rcs[0]}, ${wall}s"
}

{
echo "mpafer GPU benchmark: small=$SMALL budget=${BUDGET}s out=$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
nproc
} 2>&1 | tee -a "$LOG"

# Priority order: the required figures first; the extras run while the budget lasts. The epoch runs reuse
# the compiled graphs of the same shapes through the Inductor cache; epoch_b32 also times the b32 step alone.
bench step_b256_compiled 150 60 train-step "${MODEL[@]}" "${COMPILE[@]}" --set train.batch_size="$B_BIG" \
    --steps "$STEPS_BIG" --warmup "$WARM" --profile-out "$OUT/profile_step_b256_compiled.txt"
bench epoch_b256_compiled 80 30 epoch "${MODEL[@]}" "${COMPILE[@]}" --set train.batch_size="$B_BIG" \
    --set train.num_workers="$WORKERS" --images "$N_EPOCH" --source-size 100 --warmup "$WARM" --work-dir "$WORK"
bench step_b256_eager 60 20 train-step "${MODEL[@]}" "${EAGER[@]}" --set train.batch_size="$B_BIG" \
    --steps "$(( STEPS_BIG / 2 > 1 ? STEPS_BIG / 2 : 2 ))" --warmup 2
bench epoch_b32_compiled 120 50 epoch "${MODEL[@]}" "${COMPILE[@]}" --set train.batch_size="$B_SMALL" \
    --set train.num_workers="$WORKERS" --images "$N_EPOCH" --source-size 100 --warmup "$WARM" --step-steps "$STEPS_SMALL" --work-dir "$WORK" \
    --profile-out "$OUT/profile_epoch_b32.txt"
bench eval_compiled 90 35 eval "${MODEL[@]}" "${COMPILE[@]}" --set train.eval_batch_size="$EVAL_B" --steps "$EVAL_STEPS" \
    --warmup 2 --profile-out "$OUT/profile_eval.txt"
if [ "${#RO_MODE[@]}" -gt 0 ]; then
    bench step_b32_cudagraphs 70 35 train-step "${MODEL[@]}" "${RO_MODE[@]}" --set train.batch_size="$B_SMALL" \
        --steps "$STEPS_SMALL" --warmup "$WARM" --no-count-flops
    # the same CUDA graphs through the loop's data path (train.compile_mode=reduce-overhead): the protocol estimate
    bench epoch_b32_cudagraphs 100 50 epoch "${MODEL[@]}" "${RO_MODE[@]}" --set train.batch_size="$B_SMALL" \
        --set train.num_workers="$WORKERS" --images "$N_EPOCH" --source-size 100 --warmup "$WARM" --work-dir "$WORK"
fi
bench data_paths 60 25 data --set train.device="$DEVICE" --images "$N_DATA" --sizes "$DATA_SIZES" \
    --set train.batch_size="$B_BIG" --set train.num_workers="$WORKERS" --work-dir "$WORK"
bench step_b32_compiled 60 25 train-step "${MODEL[@]}" "${COMPILE[@]}" --set train.batch_size="$B_SMALL" \
    --steps "$STEPS_SMALL" --warmup "$WARM" --profile-out "$OUT/profile_step_b32_compiled.txt"
bench step_b256_eager_module 45 20 train-step "${MODEL[@]}" "${EAGER[@]}" --attention module \
    --set train.batch_size="$B_BIG" --steps "$(( STEPS_BIG / 2 > 1 ? STEPS_BIG / 2 : 2 ))" --warmup 2 --no-count-flops

# Summary: the targets of issue #7, met or not (a table the integrator copies into docs/PERFORMANCE.md).
python3 - "$JSONL" "$SMALL" <<'PY' 2>&1 | tee "$OUT/summary.txt" | tee -a "$LOG"
import json, sys
rows = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if line:
        r = json.loads(line)
        rows[r["label"]] = r
small = sys.argv[2] == "1"
print("label                 images/s  ms/step|s/ep  peak GiB  compiled  notes")
for label, r in rows.items():
    if "skipped" in r or "error" in r:
        print(f"{label:<21} {'-':>9}   {r.get('skipped') or r.get('error')}")
        continue
    if r["bench"] == "data":
        for d in r["results"]:
            print(f"{label:<21} src {d['source_size']}px: PIL {d.get('pil_images_per_s')}/s, cache decode "
                  f"{d.get('cache_decode_s')}s, device augment {d.get('augment_images_per_s')}/s")
        continue
    t = r.get("epoch_s") if r["bench"] == "epoch" else (r.get("step_ms") or r.get("batch_ms"))
    notes = []
    if r.get("mfu") is not None:
        notes.append(f"mfu {r['mfu']:.3f} of {r['peak_tflops']} ({r.get('achieved_tflops')} TFLOP/s, "
                     f"{r.get('gflop_per_image')} GFLOP/img, matmul {r.get('matmul_tflops_measured')})")
    if r.get("estimate_protocol_min") is not None:
        notes.append(f"{r['protocol_epochs']} epochs ~ {r['estimate_protocol_min']} min "
                     f"(setup {r['setup_s']}s, warm-up {r['warmup_s']}s)")
    if r.get("step_images_per_s") is not None:
        notes.append(f"step alone {r['step_images_per_s']}/s ({r['step_ms']} ms)")
    if r.get("warmup_s") is not None and r["bench"] != "epoch":
        notes.append(f"warm-up {r['warmup_s']}s")
    if r.get("compile_error"):
        notes.append("COMPILE FAILED: " + r["compile_error"][:120])
    print(f"{label:<21} {r.get('images_per_s', '-'):>9}   {t!s:>10}   {r.get('peak_mem_gib')!s:>8}  "
          f"{str(r.get('compiled')):<8}  {'; '.join(notes)}")

def val(label, key):
    r = rows.get(label) or {}
    return r.get(key)

epoch_ips = val("epoch_b256_compiled", "images_per_s") or val("epoch_b32_compiled", "images_per_s")
# the paper protocol: the better of the default compile and CUDA graphs (train.compile_mode) at batch 32
protocol = [v for v in (val("epoch_b32_compiled", "estimate_protocol_min"),
                        val("epoch_b32_cudagraphs", "estimate_protocol_min")) if v is not None]
targets = [
    ("train step @256 >= 5,000 img/s", val("step_b256_compiled", "images_per_s"), lambda v: v >= 5000),
    ("epoch (data incl.) >= 4,000 img/s", epoch_ips, lambda v: v >= 4000),
    ("eval >= 10,000 img/s", val("eval_compiled", "images_per_s"), lambda v: v >= 10000),
    ("120 epochs x batch 32 < 15 min", min(protocol) if protocol else None, lambda v: v < 15),
]
print()
print("targets" + (" (small CPU run: not meaningful)" if small else ""))
for name, v, ok in targets:
    state = "not measured" if v is None else ("MET" if ok(v) else "NOT MET (see profile_*.txt)")
    print(f"  {name:<36} {v!s:>10}  {state}")
PY

rm -rf "$TMPD"
log "done in $(( $(date +%s) - T0 ))s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
