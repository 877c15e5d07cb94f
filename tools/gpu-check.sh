#!/usr/bin/env bash
# Validate and measure every CUDA path in one call: bash tools/gpu-check.sh OUTDIR
# Needs a CUDA build of torch and the wheels of tools/gpu-wheels.sh in .whl/ (no network is used). Writes into OUTDIR:
# summary.md (versions, nvidia-smi, each stage's result and the tables), pytest.log + junit.xml, step.md, train.md,
# bench.log and bench-runs.tgz (each benchmark run's tables and PNG plot). Each stage has a time budget (seconds, env):
# GPU_CHECK_TESTS (225), GPU_CHECK_STEP (90), GPU_CHECK_TRAIN (165); the whole stays under ten minutes.
# GPU_CHECK_DEVICES (cuda) picks the devices the suite runs on. Without CUDA it stops, unless GPU_CHECK_ALLOW_CPU=1:
# then it runs the same plumbing on the CPU, briefly (GPU_CHECK_WHEELS=0 uses the installed packages instead of
# .whl/, whose wheels are for CPython 3.12).
set -uo pipefail
out=${1:?usage: bash tools/gpu-check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
summary=$out/summary.md
say() { echo "$*" | tee -a "$summary"; }
: >"$summary"

# 1. the device: CUDA, or a dry run on the CPU when asked for
cuda=$(python3 -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
if [ "$cuda" = 1 ]; then
  device=cuda; devices=${GPU_CHECK_DEVICES:-cuda}
  t_tests=${GPU_CHECK_TESTS:-225}; t_step=${GPU_CHECK_STEP:-90}; t_train=${GPU_CHECK_TRAIN:-165}
  step_opts=(lion adam lars adan stableadamw); step_args=(--size large --rounds 11)
  train_models=(xresnet18 vit-s16 convnext-tiny xresnet50 xse-resnext50 deberta-base convnext-small xresnet101)
  train_args=(--opt lion --path native foreach fused --steps 12)
  test_args=(tests)
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then  # a dry run of the plumbing on the CPU: small and short
  device=cpu; devices=${GPU_CHECK_DEVICES:-cpu,cuda}
  t_tests=${GPU_CHECK_TESTS:-120}; t_step=${GPU_CHECK_STEP:-60}; t_train=${GPU_CHECK_TRAIN:-60}
  step_opts=(lion); step_args=(--size small --rounds 3)
  train_models=(xresnet-small); train_args=(--opt lion --path native foreach --steps 4)
  test_args=(tests/test_cuda.py tests/test_radam.py)
else
  say "gpu-check: torch sees no CUDA device here (set GPU_CHECK_ALLOW_CPU=1 for a dry run on the CPU)"; exit 1
fi

# 2. install: carried wheels into /tmp/site, this checkout on PYTHONPATH
if [ "${GPU_CHECK_WHEELS:-1}" = 1 ] && compgen -G '.whl/*.whl' >/dev/null; then
  site=${GPU_CHECK_SITE:-/tmp/site}
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { say "gpu-check: installing .whl/ failed"; exit 1; }
  export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
launcher=$(mktemp -d)  # fxo-bench without installing: the console script's two lines (call_parse reads sys.argv)
printf 'from fastxtend_optim.bench import fxo_bench\nfxo_bench()\n' >"$launcher/fxo_bench.py"
fxo_bench=(python3 "$launcher/fxo_bench.py")

# 3. what runs here
{
  echo "# gpu-check $(date -u +%Y-%m-%dT%H:%MZ)"
  echo '```'
  python3 - <<'EOF'
import importlib.metadata as md, platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
for name in ('fastai', 'fastcore', 'bitsandbytes', 'triton', 'timm', 'torchvision', 'torch-optimi', 'pytorch_optimizer',
             'schedulefree', 'sophia-opt', 'lion-pytorch', 'pytest', 'pytest-xdist', 'pytest-timeout'):
    try: print(f'{name} {md.version(name)}')
    except md.PackageNotFoundError: print(f'{name} missing')
EOF
  git log -1 --format='commit %h %s' 2>/dev/null
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  echo '```'
} >>"$summary" 2>&1
cat "$summary"

status=0
stage() {  # stage NAME SECONDS CMD...: run with a time budget, log to OUTDIR, note the result
  local name=$1 budget=$2; shift 2
  local start=$SECONDS
  timeout -s INT -k 20 "$budget" "$@" 2>&1 | grep --line-buffered -v 'gemm_4bit_forward' | tee -a "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  local note=ok; [ "$rc" = 0 ] || note="exit $rc"; [ "$rc" = 124 ] || [ "$rc" = 130 ] && note="stopped at its ${budget}s budget"
  say "- $name: $note, $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
}

# 4. the test suite on CUDA: the GPU-only checks first, then every test's cuda case (cpu_only tests drop out)
xdist=(); python3 -c 'import xdist' 2>/dev/null && xdist=(-n "${GPU_CHECK_WORKERS:-6}" --dist loadfile)
ptimeout=(); python3 -c 'import pytest_timeout' 2>/dev/null && ptimeout=(--timeout 120)
say ''; say '## results'
stage pytest "$t_tests" env OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" python3 -m pytest -q -p no:cacheprovider -rfEs --devices "$devices" "${xdist[@]}" \
  "${ptimeout[@]}" --junitxml "$out/junit.xml" -o junit_family=xunit2 tests/test_cuda.py "${test_args[@]}"

# 5. benchmarks, one optimizer (step) or model (train) per run while the stage's budget lasts: opt.step() against
# peers on the large model, then training steps on real architectures (state memory and samples/s in train.md)
runs=$(mktemp -d)
bench_each() {  # bench_each MODE BUDGET FLAG ITEMS... -- ARGS...: one fxo-bench run per item, Markdown gathered
  local mode=$1 budget=$2 flag=$3; shift 3
  local items=(); while [ "$1" != -- ]; do items+=("$1"); shift; done; shift
  local end=$((SECONDS + budget))
  for item in "${items[@]}"; do
    local left=$((end - SECONDS))
    [ "$left" -gt 10 ] || { say "- $mode $item: skipped, the ${budget}s budget is spent"; status=1; continue; }
    stage bench "$left" "${fxo_bench[@]}" "$mode" --device "$device" "$flag" "$item" "$@" --out "$runs/$mode-$item"
    [ -f "$runs/$mode-$item/$mode.md" ] && { echo; cat "$runs/$mode-$item/$mode.md"; } >>"$out/$mode.md"
  done
}
bench_each step "$t_step" --opt "${step_opts[@]}" -- "${step_args[@]}"
bench_each train "$t_train" --model "${train_models[@]}" -- "${train_args[@]}"
for f in step.md train.md; do [ -f "$out/$f" ] && { echo; cat "$out/$f"; } >>"$summary"; done
tar czf "$out/bench-runs.tgz" -C "$runs" . && rm -rf "$runs" "$launcher"  # the PNGs and tables of each run: 8 files come back at most
ls -la "$out"
exit "$status"
