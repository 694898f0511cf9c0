#!/usr/bin/env bash
# The GPU evidence runbook: one command that turns a machine with a GPU (no network, its own torch >= 2.11
# and triton >= 3.6, none of our other dependencies required) into a report to commit.
#
#   bash scripts/gpu.sh OUT_DIR              stages info, smoke, tests, bench, report on the GPU
#   bash scripts/gpu.sh --dry-run OUT_DIR    the same stages on the CPU: Triton's interpreter, tiny sizes, small budgets
#     --stages info,smoke,...                run only these stages (always in the order above)
#     --budget NAME=SECONDS                  another budget for a stage, or for one bench suite (repeatable)
#   bash scripts/gpu.sh --summary OUT_DIR    only rewrite the summaries from the stages found (after merging runs)
#
# Nothing is installed and nothing downloaded: the machine's python (PYTHON, default python3) imports this
# checkout through PYTHONPATH, from a temporary folder of links that mirrors pyproject's package-dir.
# Every stage runs under `timeout` with its own budget (SIGINT at the budget, so pytest and the bench keep
# what they finished; SIGKILL 30 s later) and writes as it goes:
#   OUT_DIR/<device>/           the benchmark report (results.jsonl, README.md, PNGs), as in reports/<device>/
#   OUT_DIR/<device>/runbook/   <stage>.log and <stage>.status (exit, seconds, budget) per stage; info.json,
#                               smoke.jsonl, tests.xml; SUMMARY.md, one row per stage (printed at the end)
#   OUT_DIR/parallel-model/     the communication model, which `stdit report` writes beside the device folder
# A stage that fails or runs out of time never stops the later ones. Exit status 0 only if every stage
# found passed. To commit: cp -r OUT_DIR/. reports/
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
DRY=0 SUMMARY_ONLY=0 STAGES="info,smoke,tests,bench,report" OUT=""
declare -A BUDGET
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --summary) SUMMARY_ONLY=1 ;;
        --stages) STAGES=${2:?--stages needs a list}; shift ;;
        --budget) BUDGET[${2%%=*}]=${2#*=}; shift ;;
        -h|--help) usage ;;
        -*) echo "gpu.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$1 ;;
    esac
    shift
done
[ -n "$OUT" ] || usage
for s in ${STAGES//,/ }; do
    case "$s" in info|smoke|tests|bench|report) ;; *) echo "gpu.sh: unknown stage $s" >&2; exit 2 ;; esac
done
want() { [[ ",$STAGES," == *",$1,"* ]]; }
export PY=${PYTHON:-python3} PYTHONUNBUFFERED=1

# summarize OUT_DIR: write and print <device>/runbook/SUMMARY.md for every device folder, one row per stage
# found, with what its output says (standard library only, so it runs whatever else broke). Fails unless
# every stage found passed.
summarize() {
"$PY" - "$1" <<'PYTHON'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

STAGES = ["info", "smoke", "tests", "bench-kernels", "bench-fused", "bench-blocks", "bench-models", "bench-sample",
          "report"]


def jsonl(path):
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def counts(statuses):
    c = {}
    for s in statuses:
        c[s] = c.get(s, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(c.items(), key=lambda kv: -kv[1])) or "nothing recorded"


def found(d, run, name):
    """What a stage's output says, in one line."""
    try:
        if name == "info":
            i = json.loads((run / "info.json").read_text())
            devs = ", ".join(f"{x['name']} ({x['capability']})" for x in i["cuda"]["devices"]) or "no CUDA device"
            return f"{devs}; torch {i['torch']}, triton {i['triton']}, Python {i['python']}"
        if name == "smoke":
            rows = [r for r in jsonl(run / "smoke.jsonl") if "config" in r]
            bad = [r["config"] for r in rows if r["status"] != "pass"]
            more = f"; not passing: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}" if bad else ""
            return f"{len(rows)} configurations: {counts(r['status'] for r in rows)}{more}"
        if name == "tests":
            root = ET.parse(run / "tests.xml").getroot()
            s = root if root.tag == "testsuite" else root.find("testsuite")
            n = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
            return f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
        if name.startswith("bench-"):
            rows = [r for r in jsonl(d / "results.jsonl") if r.get("suite") == name[6:]]
            return f"{len(rows)} rows: {counts(r['status'].split(':')[0] for r in rows)}"
        if name == "report":
            return f"README.md, {len(list(d.glob('*.png')))} PNGs" if (d / "README.md").exists() else "no README.md"
    except (OSError, KeyError, ValueError, TypeError, AttributeError, ET.ParseError) as e:
        return f"no output to read ({type(e).__name__}: {e})"
    return ""


ok, runs = True, sorted(Path(sys.argv[1]).glob("*/runbook"))
for run in runs:
    d, rows = run.parent, []
    for name in STAGES:
        if (run / f"{name}.status").exists():
            rc, secs, budget = (run / f"{name}.status").read_text().split()
            result = {"0": "ok", "124": "out of time (interrupted)", "137": "out of time (killed)"}.get(rc, f"failed (exit {rc})")
            rows.append(f"| {name} | {result} | {secs} | {budget} | {found(d, run, name)} |")
            ok &= rc == "0"
    passed = sum("| ok |" in r for r in rows)
    text = "\n".join([f"# GPU runbook: {d.name}", "", "| stage | result | seconds | budget | found |", "|---|---|---|---|---|",
                      *rows, "", f"{passed} of {len(rows)} stages passed. Each stage's output: runbook/<stage>.log."])
    (run / "SUMMARY.md").write_text(text + "\n")
    print(text)
sys.exit(0 if runs and ok else 1)
PYTHON
}
if [ "$SUMMARY_ONLY" = 1 ]; then summarize "$OUT"; exit; fi

# Budgets in seconds. On the GPU the bench suites share 9 minutes; the dry run's are ceilings for 2 cores.
SUITES="kernels fused blocks models sample"
if [ "$DRY" = 1 ]; then
    defaults="info=60 smoke=150 tests=120 kernels=60 fused=60 blocks=60 models=60 sample=60 report=60"
else
    defaults="info=60 smoke=300 tests=300 kernels=240 fused=60 blocks=90 models=150 sample=240 report=120"
fi
for kv in $defaults; do
    [ -n "${BUDGET[${kv%%=*}]:-}" ] || BUDGET[${kv%%=*}]=${kv#*=}
done

SHIM=$(mktemp -d "${TMPDIR:-/tmp}/stdit-path.XXXXXX")
trap 'rm -rf "$SHIM"' EXIT
# PYTHONPATH cannot map stdit.kernels to kernels/ by itself: links named as pyproject's package-dir names
# them do (stdit/* files, stdit/kernels -> kernels/, ...), plus the distribution's name and version.
"$PY" - "$ROOT" "$SHIM" <<'PYTHON' || { echo "gpu.sh: $PY cannot read pyproject.toml (Python >= 3.11 needed)" >&2; exit 2; }
import sys, tomllib
from pathlib import Path
root, shim = Path(sys.argv[1]), Path(sys.argv[2])
project = tomllib.loads((root / "pyproject.toml").read_text())
(shim / "stdit").mkdir()
for package, folder in project["tool"]["setuptools"]["package-dir"].items():
    if package == "stdit":
        for f in (root / folder).glob("*.py"):
            (shim / "stdit" / f.name).symlink_to(f)
    else:
        (shim / "stdit" / package.split(".", 1)[1]).symlink_to(root / folder)
name, version = project["project"]["name"], project["project"]["version"]
(shim / f"{name}-{version}.dist-info").mkdir()
(shim / f"{name}-{version}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
PYTHON
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1  # else `python -m` puts the working directory first, whose stdit/ holds only the CLI

if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 DEVICE=cpu
else
    unset TRITON_INTERPRET
    export DEVICE=cuda
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu.sh: $PY sees no CUDA device (use --dry-run to rehearse the stages on the CPU)" >&2
        exit 2
    fi
fi
slug=$("$PY" -c "import torch; from stdit.bench.devices import device_slug; print(device_slug(torch.device('$DEVICE')))") \
    || slug=unknown-device
export DIR="$OUT/$slug"
export RUN="$DIR/runbook"
mkdir -p "$RUN"
echo "[gpu.sh] $([ "$DRY" = 1 ] && echo 'dry run on the CPU' || echo "$slug") -> $DIR (stages: $STAGES)"

# stage NAME COMMAND: run COMMAND (a bash string) under NAME's budget, its output in $RUN/NAME.log and
# "exit seconds budget" in $RUN/NAME.status.
stage() {
    local name=$1 cmd=$2 budget=${BUDGET[${1#bench-}]} start rc
    start=$(date +%s)
    echo "[gpu.sh] $name (budget ${budget} s) ..."
    timeout -s INT -k 30 "$budget" bash -c "$cmd" > "$RUN/$name.log" 2>&1
    rc=$?
    echo "$rc $(( $(date +%s) - start )) $budget" > "$RUN/$name.status"
    echo "[gpu.sh] $name: exit $rc after $(( $(date +%s) - start )) s"
}

if [ "$DRY" = 1 ]; then
    SMOKE_ARGS="--kernel D=72,bf16 --kernel C=144,fp32 --jobs 2 --probe-timeout 120"
    TEST_ARGS="tests/kernels/test_bad_input.py"
    SIZE=tiny
    declare -A ONLY=([kernels]=temporal_attention-triton [fused]=-reference- [blocks]=opensora-4x64x64-fwd-
                     [models]=STDiT-sdpa-2x64x64 [sample]=STDiT3.denoise_step-sdpa)
else
    JOBS=$(( $(nproc) < 8 ? $(nproc) : 8 ))
    SMOKE_ARGS="--jobs $JOBS"
    # every test that runs here but the training stack's (its packages are not on GPU images) and this dry run
    TEST_ARGS="tests --ignore=tests/train --ignore=tests/test_gpu_runbook.py"
    "$PY" -c "import xdist" 2>/dev/null && TEST_ARGS="$TEST_ARGS -n $JOBS"
    SIZE=full
    # sampling at Open-Sora's smallest shape only (random XL/2 weights: no T5 / VAE weights on GPU images): the
    # denoising step eager, compiled and as CUDA graphs, then whole videos per fast-sampling setting
    declare -A ONLY=([sample]=16x256x256)
fi
export SMOKE_ARGS TEST_ARGS SIZE

want info && stage info '"$PY" -m stdit info && "$PY" -m stdit info --json > "$RUN/info.json"'
want smoke && stage smoke '"$PY" -m stdit smoke --device "$DEVICE" --out "$RUN/smoke.jsonl" $SMOKE_ARGS'
want tests && stage tests '"$PY" -m pytest -q -p no:cacheprovider -rfE -m "gpu or not slow" --junitxml="$RUN/tests.xml" $TEST_ARGS'
if want bench; then
    for suite in $SUITES; do
        only=${ONLY[$suite]:+--only=${ONLY[$suite]}}
        stage "bench-$suite" "\"\$PY\" -m stdit bench --suite $suite --size \$SIZE --device \$DEVICE $only \
            --results \"\$DIR/results.jsonl\" --no-report"
    done
fi
want report && stage report '"$PY" -m stdit report --results "$DIR/results.jsonl" --out "$DIR"'
summarize "$OUT"
