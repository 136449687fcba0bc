#!/usr/bin/env bash
# Compatibility check: the whole test suite on another set of library versions, by default the
# GPU image's (docs/gpu.md, "Versions"), in a virtual environment made anew for it.
#
# What it does: recreates the environment, installs the versions below (each NAME==VERSION
# given on the command line replaces or adds one), every other dependency at constraints.txt's
# version, then zhllama itself with --no-deps (as bench/gpu_check.sh does on the GPU box) and
# DeepSpeed's config parser; `pip check` then says whether pyproject.toml's ranges hold these
# versions. Runs the suite, prints the versions and the pass/fail counts and the command that
# reproduces the run. Exits non-zero when a test fails or a range excludes a version.
#
#   bench/compat.sh                                  # the GPU image's set, in .venv-compat
#   bench/compat.sh transformers==5.20.0             # the same with one version changed
#   bench/compat.sh --venv DIR --python PY -- -x     # another place and interpreter; pytest flags after --
#   bench/compat.sh --no-install                     # rerun the suite in the existing environment
#
# The default interpreter is python3.12: the GPU image runs Python 3.12, and numpy 2.5 needs it.
# torch comes from the package index as it is (on Linux, the CUDA build with its CUDA libraries,
# a few GB; it runs on CPU).
set -euo pipefail

# The GPU image's versions (docs/gpu.md); what it lacks (peft, datasets, bitsandbytes, ...) comes
# at constraints.txt's version, as bench/gpu_check.sh brings it.
VERSIONS=(
    torch==2.11.0
    transformers==5.17.0
    tokenizers==0.23.2
    sentencepiece==0.2.2
    numpy==2.5.2
    accelerate==1.15.0
    safetensors==0.8.0
    huggingface-hub==1.33.0
)

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=$REPO/.venv-compat
PY=${PYTHON:-python3.12}
INSTALL=1
ARGS=("$@")
PYTEST=()
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV=$(realpath -m "$2"); shift ;;
        --python) PY=$2; shift ;;
        --no-install) INSTALL=0 ;;
        --) shift; PYTEST=("$@"); break ;;
        *==*) VERSIONS+=("$1") ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "compat: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# The requirement set: constraints.txt, then the versions above, a later NAME replacing an earlier.
CONSTRAINTS=$(mktemp -t zhllama-compat-XXXXXX.txt)
trap 'rm -f "$CONSTRAINTS"' EXIT
python3 - "$REPO/constraints.txt" "$CONSTRAINTS" "${VERSIONS[@]}" <<'EOF'
import re, sys
source, target, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
def name(line):  # normalised as pip compares names
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>!~ ]", line, maxsplit=1)[0]).lower()
pins = {}
for line in open(source, encoding="utf-8").read().splitlines() + overrides:
    line = line.split("#", 1)[0].strip()
    if line:
        pins[name(line)] = line
open(target, "w", encoding="utf-8").write("\n".join(pins.values()) + "\n")
EOF

if [ "$INSTALL" = 1 ]; then
    "$PY" -c "import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)" 2>/dev/null \
        || { echo "compat: $PY does not run here as Python 3.10 or later; pass --python PATH (the GPU image runs 3.12)" >&2; exit 2; }
    echo "== environment $VENV (made anew, $("$PY" --version))"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    # every package of the requirement set, at its version, then zhllama over them as it is installed there
    mapfile -t NAMES < <(sed -e 's/[=<>!~ ].*//' "$CONSTRAINTS" | grep -vx deepspeed)
    nice -n 10 "$VENV/bin/pip" install --quiet -c "$CONSTRAINTS" "${NAMES[@]}"
    nice -n 10 "$VENV/bin/pip" install --quiet --no-deps -e "$REPO"
    # without its CUDA ops, built against the torch just installed (as `make install` does)
    DS_BUILD_OPS=0 nice -n 10 "$VENV/bin/pip" install --quiet --no-build-isolation -c "$CONSTRAINTS" deepspeed
fi
[ -x "$VENV/bin/python" ] || { echo "compat: no environment at $VENV; run without --no-install first" >&2; exit 2; }

echo "== versions"
"$VENV/bin/python" - "$CONSTRAINTS" <<'EOF'
import re, sys
from importlib.metadata import PackageNotFoundError, version
wanted = [re.split(r"[=<>!~ ]", l, maxsplit=1)[0] for l in open(sys.argv[1]).read().split()]
found = []
for name in ["python"] + wanted:
    try:
        found.append(f"{name} {sys.version.split()[0] if name == 'python' else version(name)}")
    except PackageNotFoundError:
        found.append(f"{name} missing")
print(", ".join(found))
EOF

echo "== pip check (pyproject.toml's ranges against these versions)"
RANGES=0
"$VENV/bin/pip" check || RANGES=1

echo "== test suite"
cd "$REPO"
LOG=$(mktemp -t zhllama-compat-XXXXXX.log)  # kept: the counts below point to it
SUITE=0
nice -n 10 "$VENV/bin/python" -m pytest -q tests "${PYTEST[@]}" 2>&1 | tee "$LOG" || SUITE=$?

SUMMARY=$(grep -E '[0-9]+ (passed|failed|errors?|skipped).* in [0-9.]+s' "$LOG" | tail -1 || true)
count() { grep -oE "[0-9]+ $1" <<< "$SUMMARY" | grep -oE '^[0-9]+' || echo 0; }
echo "== compat: $(count passed) passed, $(count failed) failed, $(count skipped) skipped, $(count error) errors (log: $LOG)"
[ "$RANGES" = 0 ] || echo "== compat: pip check found versions outside the ranges (above)"
echo "== reproduce: bench/compat.sh$( [ ${#ARGS[@]} = 0 ] || printf ' %q' "${ARGS[@]}")"
[ "$SUITE" = 0 ] && [ "$RANGES" = 0 ]
