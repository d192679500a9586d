#!/usr/bin/env bash
# Everything a session with a lent GPU runs. A session has 15 minutes of device time, the machine's
# start (a minute or two) included, so start with the one call that fits them:
#   bash bench/gpu_session.sh first     # the most telling checks in one call of BUDGET_S (540) seconds:
#                                       # the suite natively (CUDA cases first; tests not started by 150 s skip),
#                                       # bench.mfu for gpt2, every kernel variant, then llama (triton+compile,
#                                       # compile, triton; with where each variant's step time goes:
#                                       # bench/breakdown.py), each cut at its share (rows are written as
#                                       # they are measured); every step's time lands in first.log, for the
#                                       # next plan; report.md has the README's tables of what was measured.
#                                       # (The per-op benchmarks: the ops stage; launch constants: sweep.)
# The stages below each end by BUDGET_S (540) seconds, inside one 10-minute call (timeout_s 600),
# for sessions with more device time; a stage exits 1 when a step of it failed, was cut or skipped:
#   bash bench/gpu_session.sh tests     # the whole suite natively on CUDA (CUDA-only tests included),
#                                       # in TEST_SHARDS (6) parts side by side: compiling is most of it;
#                                       # tests not started by TEST_DEADLINE skip, parts still running are
#                                       # stopped (TERM) 30 s later and killed at TESTS_GRACE_S (45), and
#                                       # every part is reported
#   bash bench/gpu_session.sh profiles  # bench.kernels profiles (gpt2, llama): profiles/<gpu>.json
#   bash bench/gpu_session.sh ops [OPS] # the per-op benchmarks (bench/op_*.py); OPS picks some, e.g.
#                                       # norm,swiglu (default all: norm,swiglu,rope,attention,cross_entropy,
#                                       # linear_cross_entropy,adamw)
#   bash bench/gpu_session.sh mfu       # bench.mfu for gpt2 and llama, every kernel variant, then
#                                       # compile and triton+compile with CUDA graphs (reduce-overhead)
#   bash bench/gpu_session.sh tune [D] [T]  # bench.tune_attention: measured flash-attention launch
#                                       # configs for head dim D (64 or 128; default both: about 95
#                                       # candidates per D, TMA twins included, compiled ahead by 8
#                                       # processes) at length T (default 4096; 1024 tunes the short-T table)
#   bash bench/gpu_session.sh sweep [SWEEPS]  # bench.sweep: the memory-bound kernels' launch constants
#                                       # (default all its sweeps; SWEEPS picks some, e.g. norm,adamw),
#                                       # each its share of the stage's time, the pick per module printed
#   bash bench/gpu_session.sh train     # train.py itself, as a user runs it (compile, kernels=auto,
#                                       # shakespeare BPE data built offline): gpt2 with adamw, then
#                                       # llama with bf16_adamw and recompute; 300 steps each
#   bash bench/gpu_session.sh curves [VARIANTS]  # bench.adamw_curves: the baby GPT, 5000 steps per AdamW
#                                       # variant (default all four: adamw,bf16_nearest,bf16_sr,bf16_kahan),
#                                       # four runs at once on the one GPU (--jobs 4); call it with
#                                       # timeout_s 600, so that its tidying after 540 s is not cut
# Results land in $OUT (at most 8 files come back, so each stage writes few): commit the profiles
# and the numbers in README with the device, date and versions, and paste the printed tune table
# into kernels/attention.py's _GPU_CONFIGS.
set -uo pipefail
usage="usage: bash bench/gpu_session.sh first|tests|tune [D] [T]|profiles|ops [OPS]|mfu|sweep [SWEEPS]|train|curves [VARIANTS]"
case ${1:-} in  # before the CUDA check: a misspelt stage is told so on any machine
  first|tests|tune|profiles|ops|mfu|sweep|train|curves) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
self=$(realpath "$0")  # the stages call it again from the repo root, wherever it was started
cd "$(dirname "$self")/.."
OUT=${OUT:-out-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/$1.log"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  # (first's own tests stage, this script again, has them in first's log: seconds of its share saved)
  [[ -n ${GPU_SESSION_CHECKED:-} ]] ||
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null
} > "$log" 2>&1
if [[ -z ${GPU_SESSION_ON_CPU:-}${GPU_SESSION_CHECKED:-} ]] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    >> "$log" 2>&1; then
  # Some benchmarks (mfu, kernels, tune_attention) on a machine without CUDA say so and exit 0: a stage would
  # look done with nothing measured. (GPU_SESSION_ON_CPU=1: the stages' own logic on a CPU, for
  # tests/test_gpu_session.py.)
  echo "stage $1: torch sees no CUDA GPU here: nothing to measure" | tee -a "$log"
  exit 2
fi
export GPU_SESSION_CHECKED=1  # once: first's own tests stage (this script again) need not import torch for it
# Every stage ends by BUDGET_S (540) seconds, inside a 10-minute call with room for its clean-up
# (a command cut by the call's own limit leaves checkpoints in $OUT and no summary).
deadline=$((SECONDS + ${BUDGET_S:-540}))
failures=0
# step CAP NAME CMD...: CMD for at most CAP seconds and never past $deadline, it and its time
# logged, a failure (a cut, a skip) counted in the stage's exit status.
step() {
  local cap=$1 name=$2 left=$((deadline - SECONDS)) t0=$SECONDS rc
  shift 2
  if ((left < 45)); then
    echo "== $name: skipped, $left s left" | tee -a "$log"
    failures=$((failures + 1))
    return
  fi
  ((cap > left)) && cap=$left
  printf '== %s: at most %s s\n$ %s\n' "$name" "$cap" "$*" | tee -a "$log"
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (cut at its limit)'), $((SECONDS - t0)) s" \
    | tee -a "$log"
  ((rc == 0)) || failures=$((failures + 1))
}
# bench.sweep's own budget: what the stage has left less a minute for its report, at least 30 s (a
# budget of 0 is a usage error); the step's cap stops it anyway.
sweep_budget() { local b=$((deadline - SECONDS - 60)); echo $((b > 30 ? b : 30)); }
# bench.mfu's --budget-s for a step of CAP seconds: CAP less MFU_LAST_S (75), at least 1.
MFU_LAST_S=75
mfu_budget() { local b=$(($1 - MFU_LAST_S)); echo $((b > 1 ? b : 1)); }
TESTS_GRACE_S=${TESTS_GRACE_S:-45}  # the tests stage's time past TEST_DEADLINE to stop its parts and kill them
case "$1" in
  first)  # the order is the priority: what a cut-short call loses is the least telling
    tests_s=$(((deadline - SECONDS) * 150 / 540))  # tests not started by then skip: the summary comes
    # 14 parts: compiling the kernels is most of the suite's time there, and the machine has 16 cores.
    # The stage stops its parts itself by TEST_DEADLINE + 45 s (TESTS_GRACE_S) and reports them: the
    # step's own cut comes later, and only if that fails.
    step $((tests_s + TESTS_GRACE_S + 30)) tests env TEST_DEADLINE=$(($(date +%s) + tests_s)) \
      TEST_SHARDS=${TEST_SHARDS:-14} bash "$self" tests
    # bench.mfu writes each variant as it is measured, in the order of what they tell: the Triton
    # kernels inside torch.compile (the fastest, if any is) and torch.compile, the eager pair (quick:
    # no compile), train.py's default on a GPU (auto+compile: per op the backend the committed
    # profile chose), then the Triton kernels in torch.compile as CUDA graphs (reduce-overhead: what
    # the host's launches cost the step; the mfu stage measures compile's too). What the tests left
    # goes three fifths to GPT-2, the rest to LLaMA. --budget-s starts no variant later than the
    # step's cap less MFU_LAST_S: the last one's time to compile (up to a minute), measure and
    # print, and bench.mfu's own start (its budget counts from then).
    gpt2_s=$(((deadline - SECONDS) * 3 / 5))
    step $gpt2_s "mfu gpt2" python -m bench.mfu --gpu auto --preset gpt2 \
      --kernels triton+compile,compile,triton,torch,auto+compile,triton+compile:reduce-overhead \
      --steps 30 --warmup 8 --budget-s $(mfu_budget $gpt2_s) --json "$OUT/mfu-gpt2.json"
    llama_s=$((deadline - SECONDS))
    step $llama_s "mfu llama" python -m bench.mfu --gpu auto --preset llama --kernels triton+compile,compile,triton \
      --steps 20 --warmup 6 --budget-s $(mfu_budget $llama_s) --json "$OUT/mfu-llama.json"
    results=("$OUT"/mfu-*.json)  # bench.report makes tables of these
    [[ -e ${results[0]} ]] && python -m bench.report "${results[@]}" > "$OUT/report.md" 2>> "$log" ;;
  tests)  # one TEST_SEED for all parts (printed), so a failure replays with it and TEST_SHARD
    export TEST_SEED=${TEST_SEED:-$(python -c 'import random; print(random.randrange(2**31))')}
    # Tests not started by TEST_DEADLINE skip (first sets it; alone, the stage's budget less its
    # stopping and summary), so that the summary comes before the call's limit.
    export TEST_DEADLINE=${TEST_DEADLINE:-$(($(date +%s) + ${BUDGET_S:-540} - TESTS_GRACE_S - 45))}
    # One Inductor compile worker a part: by default each would start one per core, on every core.
    export TORCHINDUCTOR_COMPILE_THREADS=1
    shards=${TEST_SHARDS:-6}
    parts=$(mktemp -d)  # not under $OUT: at most 8 files come back from there
    export ACCURACY_LOG=$parts/accuracy.jsonl  # every accuracy check, counted below (tests/numerics.py)
    pids=()
    for i in $(seq 0 $((shards - 1))); do
      TEST_SHARD=$i/$shards python -m pytest -q -ra --durations=8 -p no:cacheprovider > "$parts/$i" 2>&1 &
      pids+=($!)
    done
    # A part still running past the deadline (a test begun before it) is stopped two thirds of
    # TESTS_GRACE_S after it (its summary printed), and killed at TESTS_GRACE_S if stuck in a long
    # compile or CUDA call: then the summary below comes all the same.
    stop_parts() { kill -TERM "${pids[@]}" 2>/dev/null; sleep "$1"; kill -KILL "${pids[@]}" 2>/dev/null; }
    term_at=$((TEST_DEADLINE + TESTS_GRACE_S * 2 / 3))
    # Its output detached and its sleep killed with it: a sleep left holding the stage's stdout
    # would keep a reader of it (first's tee, the device call) waiting until term_at.
    (trap 'kill "$nap" 2>/dev/null; exit' TERM
     sleep $((term_at > $(date +%s) ? term_at - $(date +%s) : 0)) & nap=$!
     wait "$nap" && stop_parts $((TESTS_GRACE_S / 3))) </dev/null >/dev/null 2>&1 &
    watchdog=$!
    show_parts() {  # each part's whole output into tests.log; its failures and summary shown too
      for i in $(seq 0 $((shards - 1))); do
        echo "== TEST_SHARD=$i/$shards TEST_SEED=$TEST_SEED"
        cat "$parts/$i"
      done >> "$log" 2>&1
      for i in $(seq 0 $((shards - 1))); do
        # pytest's counts: its last line, unless an interruption printed more after them
        summary=$(grep -E '[0-9]+ (passed|failed|skipped|deselected|errors?)|no tests ran' "$parts/$i" | tail -n 1)
        echo "TEST_SHARD=$i/$shards: ${summary:-no summary (killed while stuck?): $(tail -n 1 "$parts/$i")}"
        grep -E '^(FAILED|ERROR) ' "$parts/$i"
      done
      [[ -s $ACCURACY_LOG ]] && python -m tests.numerics "$ACCURACY_LOG" | tee -a "$log"
      rm -rf "$parts"
    }
    # A signal (the step's cut, which kills everything 10 s on): stop the parts sooner, then report
    trap 'kill "$watchdog" 2>/dev/null; stop_parts 4; wait; show_parts; echo "tests: stopped by a signal"; exit 124' \
      TERM INT
    failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
    trap - TERM INT
    kill "$watchdog" 2>/dev/null
    show_parts
    echo "tests: $failed of $shards parts failed" | tee -a "$log"
    status=$((failed > 0)) ;;
  profiles)  # both workloads into this GPU's committed profile (others kept), which comes back; a
    # preset cut at its limit leaves the ops it measured in profiles/<slug>.<preset>.partial.json
    slug=$(python -c "from bench.hardware import detect; print(detect().slug)")
    for preset in gpt2 llama; do
      step 300 "profile $preset" python -m bench.kernels --gpu auto --preset "$preset"
    done
    for f in "profiles/$slug.json" profiles/"$slug".*.partial.json; do
      [[ -e $f ]] && cp "$f" "$OUT/"
    done ;;
  ops)
    ops=${2:-norm,swiglu,rope,attention,cross_entropy,linear_cross_entropy,adamw}
    for op in ${ops//,/ }; do
      step 540 "op_$op" python -m bench.op_$op --json "$OUT/op_$op.json"
    done ;;
  mfu)
    for preset in gpt2 llama; do
      cap=$((deadline - SECONDS < 300 ? deadline - SECONDS : 300))  # step's own cut: its budget's base
      step $cap "mfu $preset" python -m bench.mfu --gpu auto --preset "$preset" \
        --kernels triton+compile,compile,triton,torch,auto+compile,triton+compile:reduce-overhead,compile:reduce-overhead \
        --budget-s $(mfu_budget $cap) --json "$OUT/mfu-$preset.json"
    done ;;
  tune)
    dims=${2:-64,128} t=${3:-4096}
    step 540 tune python -m bench.tune_attention --d "$dims" --t "$t" --json "$OUT/tune_attention-${dims//,/-}-t$t.json" ;;
  sweep)
    # Its own budget ends a setting's length (a norm setting compiles its kernels at 5 widths)
    # before the step's: cut by the step, it would print no report.
    step 540 sweep python -m bench.sweep ${2:+--sweeps "$2"} --budget-s "$(sweep_budget)" --json "$OUT/sweep.json" ;;
  train)  # the logs come back ($OUT/train-<preset>/log.jsonl), the checkpoints are deleted
    common=(--dataset=shakespeare --batch_size=16 --block_size=1024 --gradient_accumulation_steps=1
            --max_iters=300 --lr_decay_iters=300 --warmup_iters=30 --eval_interval=150 --eval_iters=20
            --log_interval=25)
    step 270 train-gpt2 python train.py config/train_gpt2.py "${common[@]}" --out_dir="$OUT/train-gpt2"
    step 270 train-llama python train.py config/train_llama.py "${common[@]}" --optimizer=bf16_adamw \
      --recompute=True --out_dir="$OUT/train-llama"
    # everything but the logs: a cut save leaves a half-written checkpoint (.ckpt.pt.<pid>...tmp) too
    find "$OUT"/train-* -mindepth 1 ! -name log.jsonl -exec rm -rf {} + 2>/dev/null ;;
  curves)  # only the logs come back ($OUT/curves/<variant>/log.jsonl, its start record folded in: five files with
    # this stage's log): tidy deletes the rest, a cut-off run's checkpoints and console output too (its tail shown)
    step 540 curves python -m bench.adamw_curves run --out "$OUT/curves" --scale gpu --jobs 4 \
      --variants "${2:-adamw,bf16_nearest,bf16_sr,bf16_kahan}"
    python -m bench.adamw_curves tidy --out "$OUT/curves" 2>&1 | tee -a "$log" ;;
esac
echo "stage $1: ${SECONDS} s, $failures step(s) failed, cut or skipped" | tee -a "$log"  # for the next plan
exit $(( ${status:-0} || failures > 0 ))
