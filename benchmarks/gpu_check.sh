#!/usr/bin/env bash
# One prepared GPU check for lefusion-nnunet (issue 16): runs in one go, in under 8 minutes on one H200, and
# writes JSON to $OUT (or ./gpu_check_out):
#   install.json            what was installed (or why it could not be: PyPI may be unreachable there)
#   cuda_checks.json        CUDA-marked pytest tests (if the suite registers a `cuda` marker) and the sampler
#                           checks on the device: exact background, CPU vs CUDA, batch independence, bf16
#   sampling_<preset>_<sampler>.json   lesions/s at 64x64x32, batch 1..64, bf16 autocast (benchmarks/sampling_speed.py)
#   training_speed.json     steps/s and memory per sample (benchmarks/training_speed.py)
#   bank_build.json         `lefusion demo --device cuda` (in $TMPDIR): lesion model, enlarge, LeFusionTrainer bank
#                           build + a 1-epoch nnU-Net run; the bank manifest and the trainer's bank log lines
#   gpu_check.json          everything above in one object, with each part's exit status and seconds
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # CPU smoke test of every part at tiny sizes (a few minutes)
#   bash benchmarks/gpu_check.sh --dry-run --with-demo   # ... including a CPU demo without nnU-Net
set -uo pipefail

DRY=0
WITH_DEMO=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --with-demo) WITH_DEMO=1 ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $arg (use --dry-run, --with-demo)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
OUT_DIR="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
PY="${PYTHON:-python}"
T0=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-460}          # stop starting parts after this (the whole run stays under 8 min)
STATUS_FILE="$OUT_DIR/.parts.tsv"
: > "$STATUS_FILE"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; PRESETS="tiny"; BATCHES="1 2"; SAMPLERS="ddim:2 dpmpp2m:2"; REPEATS=1; TRAIN_STEPS=1
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
  DEVICE=cuda; PRESETS="small base"; BATCHES="1 2 4 8 16 32 64"; SAMPLERS="ddim:25 dpmpp2m:10"; REPEATS=3
  TRAIN_STEPS=10
fi

log() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG" >&2; }

# part NAME TIMEOUT_S CMD...: runs CMD with a time limit, records its exit status and duration
part() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - T0) ))
  if [ "$left" -le 10 ]; then
    log "skip $name: time budget spent"
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$STATUS_FILE"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  log "start $name (limit ${limit}s): $*"
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" >> "$STATUS_FILE"
  log "end $name: rc=$rc"
  return 0
}

# -- 1. install (only what is missing; never replace an installed torch) -------------------------------
log "python: $($PY --version 2>&1)"
MISSING=$($PY - <<'EOF'
import importlib.util
mods = {"torch": "torch", "nnunetv2": "nnunetv2", "batchgeneratorsv2": "batchgeneratorsv2",
        "SimpleITK": "SimpleITK", "numpy": "numpy", "scipy": "scipy", "skimage": "scikit-image",
        "sklearn": "scikit-learn", "matplotlib": "matplotlib", "tqdm": "tqdm"}   # pytest: only for marked tests
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
EOF
)
TORCH_VERSION=$($PY -c "import torch; print(torch.__version__)" 2>/dev/null || true)
INSTALL_NOTE=""
if $PY -c "import lefusion_nnunet, sys, os; sys.exit(0 if os.path.realpath(lefusion_nnunet.__path__[0]).startswith(os.path.realpath('$REPO')) else 1)" 2>/dev/null \
   && [ -z "$MISSING" ]; then
  INSTALL_NOTE="already installed from this checkout"
else
  CONSTRAINTS="$OUT_DIR/.constraints.txt"
  if [ -n "$TORCH_VERSION" ]; then            # keep the machine's torch (a CUDA build): pin it, drop our CPU pin
    grep -v -E '^torch([=<>!~ ]|$)' constraints.txt > "$CONSTRAINTS"
    echo "torch==${TORCH_VERSION}" >> "$CONSTRAINTS"
  else
    cp constraints.txt "$CONSTRAINTS"
  fi
  if [ -z "$MISSING" ]; then
    log "all dependencies present; installing the package only (no network needed)"
    $PY -m pip install --no-deps --no-build-isolation -e . >> "$LOG" 2>&1
  else
    log "missing: $MISSING; trying pip (PyPI may be unreachable on this machine)"
    $PY -m pip install --retries 1 --timeout 20 --no-build-isolation -c "$CONSTRAINTS" -e . >> "$LOG" 2>&1
  fi
  if [ $? -ne 0 ] || ! $PY -c "import lefusion_nnunet, torch, nnunetv2" 2>/dev/null; then
    MSG="could not install lefusion-nnunet: missing [$MISSING] and pip could not fetch them (is PyPI reachable? \
torch present: ${TORCH_VERSION:-no}). Install them from a local wheelhouse (pip install --no-index --find-links DIR ...) \
and rerun; see $LOG."
    log "$MSG"
    $PY -c "import json,sys; json.dump({'ok': False, 'error': sys.argv[1], 'missing': sys.argv[2].split()}, open(sys.argv[3], 'w'), indent=2)" \
      "$MSG" "$MISSING" "$OUT_DIR/install.json"
    echo "gpu_check: $MSG" >&2
    exit 1
  fi
  INSTALL_NOTE="installed (missing before: ${MISSING:-none})"
fi
$PY - "$OUT_DIR/install.json" "$INSTALL_NOTE" <<'EOF'
import json, platform, sys, torch
info = {"ok": True, "note": sys.argv[2], "python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info))
EOF
if [ "$DEVICE" = cuda ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  log "torch.cuda.is_available() is False on this machine: nothing to measure (use --dry-run for the CPU smoke test)"
  exit 1
fi
export OUT_DIR DEVICE

# -- 2. CUDA-marked tests and the sampler checks on the device ---------------------------------------------
if grep -q -E '^\s*cuda\s*:' setup.cfg pyproject.toml 2>/dev/null || grep -q 'addinivalue_line.*cuda' tests/conftest.py 2>/dev/null; then
  if $PY -c "import pytest" 2>/dev/null; then
    part pytest_cuda 120 $PY -m pytest -q -m cuda tests --junitxml="$OUT_DIR/pytest_cuda.xml"
  else
    log "pytest is not installed: CUDA-marked tests skipped"
    printf '%s\t%s\t%s\n' "pytest_cuda" "no-pytest" 0 >> "$STATUS_FILE"
  fi
else
  log "no 'cuda' pytest marker is registered in this checkout: device checks below only"
  printf '%s\t%s\t%s\n' "pytest_cuda" "no-cuda-marker" 0 >> "$STATUS_FILE"
fi
part cuda_checks 120 $PY - <<'EOF'
import json, os, time
import torch
from lefusion_nnunet.diffusion import DenoiserConfig, LesionDenoiser, NoiseSchedule, SamplerConfig, ScheduleConfig
from lefusion_nnunet.diffusion import make_sampler
dev, out = os.environ["DEVICE"], {}
schedule = NoiseSchedule(ScheduleConfig(300))
g = torch.Generator().manual_seed(0)
known = (torch.rand(3, 1, 32, 64, 64, generator=g) * 2 - 1)
zz, yy, xx = torch.meshgrid(*[torch.arange(n) for n in (32, 64, 64)], indexing="ij")
mask = ((((zz - 16) ** 2 + (yy - 32) ** 2 + (xx - 32) ** 2) <= 64).float())[None, None].expand(3, 1, -1, -1, -1)
toy = lambda x, t: 0.6 * torch.tanh(3 * x)                                   # elementwise eps: exact comparisons
for spec in (SamplerConfig(), SamplerConfig(name="dpmpp2m"), SamplerConfig(name="repaint", jump_length=1, jump_n_sample=1)):
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]    # CPU generators: same noise on both
    s = make_sampler(spec)
    cpu = s.sample(toy, schedule, known, mask, generator=gens())
    t0 = time.perf_counter()
    gpu = s.sample(toy, schedule, known.to(dev), mask.to(dev), generator=gens())
    alone = s.sample(toy, schedule, known[1:2].to(dev), mask[1:2].to(dev), generator=gens()[1:2])
    inside = mask.bool().expand_as(known)
    out[spec.name] = {"seconds": time.perf_counter() - t0,
                      "background_bit_exact": bool(torch.equal(gpu.cpu()[~inside], known[~inside])),
                      "max_abs_cpu_vs_device": float((gpu.cpu() - cpu).abs().max()),
                      "batch_independent_bit_exact": bool(torch.equal(alone[0], gpu[1]))}
model = LesionDenoiser(DenoiserConfig.from_preset("tiny" if dev == "cpu" else "small")).to(dev).eval()
ctx, cond = (known * (1 - mask)).to(dev), torch.full((3, 16), 1 / 16, device=dev)
def eps_fn(x, t):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda")):
        return model(x, t, ctx[: x.shape[0]], mask[: x.shape[0]].to(dev), cond[: x.shape[0]]).float()
s = make_sampler(SamplerConfig(name="dpmpp2m", num_steps=4 if dev == "cpu" else 10))
res = s.sample(eps_fn, schedule, known.to(dev), mask.to(dev), generator=[torch.Generator().manual_seed(i) for i in range(3)])
inside = mask.bool().expand_as(known)
out["model_bf16"] = {"finite": bool(torch.isfinite(res).all()), "in_range": bool(res.abs().max() <= 1.0),
                     "background_bit_exact": bool(torch.equal(res.cpu()[~inside], known[~inside]))}
out["ok"] = all(v.get("background_bit_exact", True) and v.get("batch_independent_bit_exact", True)
                and v.get("max_abs_cpu_vs_device", 0) < 1e-4 for v in out.values() if isinstance(v, dict)) \
    and out["model_bf16"]["finite"]
json.dump(out, open(os.path.join(os.environ["OUT_DIR"], "cuda_checks.json"), "w"), indent=2)
print(json.dumps(out))
EOF

# -- 3. sampling throughput: presets x default samplers, batch 1..64, bf16 autocast on CUDA --------------------
sampling() {   # sampling PRESET: every sampler of $SAMPLERS (GFLOP/s measured with the first one only)
  local preset="$1" sampler extra
  for sampler in $SAMPLERS; do
    extra=""
    [ "$sampler" != "${SAMPLERS%% *}" ] && extra="--skip-efficiency"
    part "sampling_${preset}_${sampler/:/_}" 110 $PY benchmarks/sampling_speed.py --device "$DEVICE" --preset "$preset" \
      --sampler "$sampler" --batch-sizes $BATCHES --paths synthesis sampler --repeats "$REPEATS" $extra \
      --out "$OUT_DIR/sampling_${preset}_${sampler/:/_}.json"
  done
}
FIRST_PRESET="${PRESETS%% *}"
sampling "$FIRST_PRESET"

# -- 4. training steps/s and memory per sample ---------------------------------------------------------------
part training_speed 120 $PY benchmarks/training_speed.py --device "$DEVICE" --presets $PRESETS --steps "$TRAIN_STEPS" \
  --out "$OUT_DIR/training_speed.json"

# -- 5. LeFusionTrainer bank build on the device (through the demo: phantom, lesion model, enlarge, nnU-Net) -----
if [ "$DRY" = 0 ] || [ "$WITH_DEMO" = 1 ]; then
  DEMO_DIR="${TMPDIR:-/tmp}/lefusion_gpu_check_demo"      # outside $OUT: datasets and checkpoints stay here
  DEMO_ARGS=(--device "$DEVICE" -o "$DEMO_DIR" --overwrite)
  [ "$DRY" = 1 ] && DEMO_ARGS+=(--skip-nnunet --steps 2 --cases 4 --preset tiny)
  part bank_build 240 $PY -m lefusion_nnunet.cli.main demo "${DEMO_ARGS[@]}"
  $PY - "$LOG" "$OUT_DIR/bank_build.json" "$DEMO_DIR" <<'EOF'
import glob, json, os, re, sys
text, demo = open(sys.argv[1]).read(), sys.argv[3]
done = re.findall(r"== done in (\d+) s \(([^)]*)\)", text)
banks = []
for manifest in glob.glob(os.path.join(demo, "nnUNet_preprocessed", "*", "lefusion_bank", "*", "bank.json")):
    m = json.load(open(manifest))
    banks.append({"folder": os.path.basename(os.path.dirname(manifest)),
                  "entries": {k: (len(v) if isinstance(v, (list, dict)) else v) for k, v in m.items()}})
trainer_lines = []
for log in glob.glob(os.path.join(demo, "nnUNet_results", "**", "training_log_*.txt"), recursive=True):
    trainer_lines += [l.strip() for l in open(log, errors="replace") if "bank" in l.lower() or "lefusion" in l.lower()]
json.dump({"finished": bool(done), "total_seconds": int(done[-1][0]) if done else None,
           "timings": done[-1][1] if done else None, "banks": banks, "trainer_log_lines": trainer_lines[-30:]},
          open(sys.argv[2], "w"), indent=2)
EOF
fi

# -- 6. the other presets' sampling throughput, with what is left of the time budget --------------------------------
for preset in $PRESETS; do
  [ "$preset" != "$FIRST_PRESET" ] && sampling "$preset"
done

# -- summary ----------------------------------------------------------------------------------------------------
$PY - "$OUT_DIR" "$STATUS_FILE" "$(( $(date +%s) - T0 ))" "$DRY" <<'EOF'
import glob, json, os, sys
out_dir, status, seconds, dry = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
parts = {}
for line in open(status):
    name, rc, sec = line.rstrip("\n").split("\t")
    parts[name] = {"rc": rc, "seconds": int(sec)}
files = {}
for path in sorted(glob.glob(os.path.join(out_dir, "*.json"))):
    if os.path.basename(path) != "gpu_check.json":
        try:
            files[os.path.basename(path)[:-5]] = json.load(open(path))
        except ValueError:
            files[os.path.basename(path)[:-5]] = "unreadable"
small = {k: v.get("sampler_loop_best") for k, v in files.items() if k.startswith("sampling_small") and isinstance(v, dict)}
summary = {"dry_run": dry, "total_seconds": seconds, "parts": parts,
           "small_sampler_loop_best_lesions_per_second": small,
           "target_small_lesions_per_second_at_least": 100, "results": files}
json.dump(summary, open(os.path.join(out_dir, "gpu_check.json"), "w"), indent=2)
print(json.dumps({k: summary[k] for k in ("dry_run", "total_seconds", "parts", "small_sampler_loop_best_lesions_per_second")},
                 indent=2))
EOF
log "done: $OUT_DIR/gpu_check.json"
