#!/usr/bin/env bash
# Every GPU measurement of issue 15 in one run, each part under its own `timeout`, cheap and most
# important first, inside one overall deadline (SUITE_S, default 530 s), so a slow part still leaves
# the earlier results. JSON lands in benchmarks/results/*cuda*.json; a tarball of them, the log and the
# stage-3 grid go to $OUT.
#
#   cd .gpu/tree && bash benchmarks/gpu_suite.sh        # on the GPU machine (wheels in ../whl)
#   bash benchmarks/gpu_suite.sh --cpu-smoke            # the same steps at tiny sizes on this CPU
#
# Parts: env (nvidia-smi, torch) | data: 20,480 synthetic samples packed (process pool), with the CUDA
# tests of the new code beside it | P3 SSIM vs kornia | P7 fed vs resident (serial, DeviceFeed) |
# step img/s + loss share, fp32/bf16/fp16 | fp16+GradScaler runs (stage 1, 3) | 3-stage quality.
set -u
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=1
OUT=${OUT:-/tmp/gpu_suite_out}
mkdir -p "$OUT"
LOG=$OUT/suite.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SUITE_S=${SUITE_S:-530}

if [ $SMOKE = 1 ]; then
    PY=${PY:-/work/main/.venv/bin/python}
    export PYTHONPATH=$PWD
    DEV=cpu
    DATA=$(mktemp -d /tmp/gpu-suite-smoke-XXXX)/ds
    SAMPLES=320
    Q="--quick"
    TAG="--tag smoke"
else
    PY=${PY:-python3}
    if ls ../whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../whl/*.whl ||
            echo "!!! wheel install failed"
        export PYTHONPATH=/tmp/site:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    DEV=cuda
    DATA=/tmp/suite-ds
    SAMPLES=20480
    Q=""
    TAG=""
fi

left() { echo $((T0 + SUITE_S - $(date +%s))); }
# part NAME CAP_S cmd...: run under timeout min(CAP_S, time left), report rc and seconds
part() {
    local name=$1 cap=$2 t rc s
    shift 2
    t=$(left)
    [ "$t" -gt "$cap" ] && t=$cap
    if [ "$t" -lt 15 ]; then
        echo "=== $name SKIPPED: ${t}s left"
        return
    fi
    s=$(date +%s)
    echo "=== $name (timeout ${t}s) at +$((s - T0))s"
    timeout -k 5 "$t" "$@"
    rc=$?
    echo "=== $name rc=$rc in $(($(date +%s) - s))s"
}

echo "=== env"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv 2>&1 | head -3
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, 'cores', __import__('os').cpu_count())"
$PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
$PY -c "import kornia, pytorch_msssim, simplejpeg; print('kornia', kornia.__version__, 'simplejpeg', simplejpeg.__version__)" 2>&1 | tail -1

# data (all cores) with the CUDA tests of the new code beside it (they compile the SSIM: warms the cache)
TESTS="tests/test_losses.py tests/data/test_device_feed.py"
[ $SMOKE = 1 ] && TESTS="tests/data/test_device_feed.py"
(timeout -k 5 100 $PY -m pytest -q -p no:cacheprovider $TESTS >"$OUT/tests.log" 2>&1; echo "tests rc=$?" >>"$OUT/tests.log") &
TPID=$!
part data 150 $PY -c "
import time; t = time.time()
from ray_mmd.data.pack import make_synthetic
m = make_synthetic('$DATA', $SAMPLES, 1024 if $SAMPLES > 4096 else 64, seed=0, test_fraction=0.05)
print('packed', m.num_samples, m.split_counts, f'{time.time() - t:.1f}s')"
wait $TPID
echo "=== tests (CUDA paths of DeviceFeed and the compiled SSIM)"
tail -4 "$OUT/tests.log"

part p3_ssim 90 $PY benchmarks/bench_ssim.py --device $DEV $Q $TAG
part p7_input 190 $PY benchmarks/bench_gpu_input.py --device $DEV --data "$DATA" --feed-thread $Q $TAG
part step 120 $PY benchmarks/bench_step.py --device $DEV $Q $TAG
part amp 100 $PY benchmarks/bench_gpu_amp.py --device $DEV --data "$DATA" $Q $TAG
# quality gets what is left (minus 15 s to pack up), split 30/20/50 over the stages as wall budgets
Q_LEFT=$(($(left) - 15))
B1=$((Q_LEFT * 30 / 100 - 10))
B2=$((Q_LEFT * 20 / 100 - 10))
B3=$((Q_LEFT * 50 / 100 - 15))
part quality $((Q_LEFT > 15 ? Q_LEFT : 15)) $PY benchmarks/bench_quality.py --device $DEV --data "$DATA" $Q $TAG --budget-s $B1,$B2,$B3

echo "=== pack up at +$(($(date +%s) - T0))s"
PAT='*cuda*'
[ $SMOKE = 1 ] && PAT='*smoke*'
cp "$OUT/tests.log" benchmarks/results/ 2>/dev/null
# shellcheck disable=SC2086
tar czf "$OUT/results.tgz" -C benchmarks/results $(cd benchmarks/results && ls $PAT 2>/dev/null) tests.log
rm -f benchmarks/results/tests.log
for f in benchmarks/results/bench_quality_*stage3_grid.png; do [ -f "$f" ] && cp "$f" "$OUT/grid.png"; done
echo "=== summary"
$PY - "$PAT" <<'EOF'
import glob, json, sys
def g(d, *ks):
    for k in ks:
        d = d.get(k) if isinstance(d, dict) else None
    return d
def f(v, p=2):
    return "-" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))
for p in sorted(glob.glob("benchmarks/results/" + sys.argv[1] + ".json")):
    d = json.load(open(p))
    n = d["name"]
    if n.startswith("bench_ssim"):
        for r in d["rows"]:
            print(f"P3 ssim {tuple(r['shape'])}: ours {r['seconds']['ours'] * 1e3:.3f} ms, x{f(r.get('speedup_vs_kornia'))} vs kornia, x{f(r.get('speedup_vs_ours_eager'))} vs eager ours, compiled={r.get('compiled')}")
    elif n.startswith("bench_gpu_input"):
        for k in ("stage1_56", "stage3_224"):
            r = d.get(k)
            if r:
                print(f"P7 {k}: resident {r['train_resident_batch_img_s']:.0f}, serial {r['fed_serial_vs_resident']:.2f}x (busy {f(g(r, 'gpu_busy_fed_serial', 'busy_frac'))}), DeviceFeed {r['fed_device_feed_vs_resident']:.2f}x (busy {f(g(r, 'gpu_busy_fed_device_feed', 'busy_frac'))}), stream host {r['stream_host_img_s']:.0f} to-device {r['stream_to_device_serial_img_s']:.0f} img/s, equal={r['device_feed_batches_equal_serial']}" + (f", DeviceFeed thread {r['fed_device_feed_thread_vs_resident']:.2f}x" if 'fed_device_feed_thread_vs_resident' in r else ""))
    elif n.startswith("bench_step"):
        for r in d["rows"]:
            print(f"step {r['stage']} {r['amp']}: {r['img_per_s']:.0f} img/s, loss share {100 * r['ours']['loss_share']:.1f}% (kornia recipe {100 * g(r, 'kornia_recipe', 'loss_share'):.1f}%), syncs: {r.get('host_syncs_in_step', '-')[:20]}" if r.get("kornia_recipe") else f"step {r['stage']} {r['amp']}: {r['img_per_s']:.0f} img/s, loss share {100 * r['ours']['loss_share']:.1f}%")
    elif n.startswith("bench_gpu_amp"):
        for r in d["runs"]:
            print(f"amp stage{r['stage']} {r['amp']}: skipped {r['skipped_steps'][:8]} (after 20: {r['skipped_after_first_20']}), loss {f(r['loss_first_mean'], 4)} -> {f(r['loss_last_mean'], 4)}, {f(r['steady_img_s'], 0)} img/s, scale {r['scale_first_last']}")
    elif n.startswith("bench_quality"):
        for r in d["stages"]:
            print(f"quality stage {r['stage']}: {r['wall_s']:.0f}s, {r['epochs_run']}/{r['epochs_planned']} epochs, {r['steps']} steps, {r['train_img_s']:.0f} img/s -> " + " ".join(f"{k} {v:.4f}" for k, v in r["final"].items()))
        print("quality goal met:", d.get("goal_met"))
EOF
echo "=== done at +$(($(date +%s) - T0))s"
