#!/usr/bin/env bash
# docs/quickstart.md as a newcomer runs it, on a fresh clone (`make test-quickstart`; CI runs it):
#   bash tests/quickstart.sh [DIR]
# DIR is a clone to run in; without it, this repository's HEAD is cloned into a temp dir (removed
# afterwards). Then: `make run` (its own .venv with the pinned deps, then the tiny pipeline end to
# end), `make ui` in the background on a free port, and the MLflow REST API of that UI server
# must list the run: one parent run, FINISHED, with a FINISHED stage run (with metrics) for every
# stage. The serve stage gets a free port too (serve.port, through RUN_ARGS): 8000 may be taken
# on a shared machine. Needs git, make, python3.11 and what `make run` needs to install the deps.
set -euo pipefail

# a newcomer's shell: a local Ray and ./mlflow.db, whatever this machine's environment points at
unset RAY_ADDRESS MLFLOW_TRACKING_URI
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3.11}"
logs="$(mktemp -d)"
made=""
if [[ $# -ge 1 ]]; then
    dir="$(cd "$1" && pwd)"
else
    made="$(mktemp -d)"
    dir="$made/ernie-pipeline"
    git clone --quiet "$repo" "$dir"
fi

ui_pid=""
cleanup() {
    status=$?
    if [[ -n "$ui_pid" ]]; then
        kill -TERM -- "-$ui_pid" 2>/dev/null || true # make, mlflow ui and its server processes
        for _ in $(seq 30); do kill -0 -- "-$ui_pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$ui_pid" 2>/dev/null || true
    fi
    if [[ $status -ne 0 && -s "$logs/ui.log" ]]; then
        echo "--- make ui (last lines) ---" >&2
        tail -n 40 "$logs/ui.log" >&2
    fi
    rm -rf "$logs"
    [[ -n "$made" ]] && rm -rf "$made"
    exit $status
}
trap cleanup EXIT

free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cd "$dir"
echo "quickstart in $dir"
start=$SECONDS

# 1. make run
make run RUN_ARGS="serve.port=$(free_port)" 2>&1 | tee "$logs/run.log"
run_s=$((SECONDS - start))
parent="$(sed -n 's/.*MLflow: .*parent run \([0-9a-f]\{32\}\).*/\1/p' "$logs/run.log" | tail -n 1)"
if [[ -z "$parent" ]]; then
    echo "make run did not print its MLflow parent run" >&2
    exit 1
fi

# 2. make ui, in the background (its own process group, so that it is stopped with its children)
port="$(free_port)"
set -m
make ui UI_PORT="$port" >"$logs/ui.log" 2>&1 &
ui_pid=$!
set +m
ui_start=$SECONDS

# 3. the UI server answers, serves the UI page, and lists the run over its REST API
.venv/bin/python - "$port" "$parent" <<'EOF'
import json
import sys
import time
import urllib.parse
import urllib.request

port, parent_id = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
STAGES = {"data", "pretrain", "sft", "dpo", "quantize", "serve"}


def get(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return reply.status, reply.read().decode()


deadline = time.time() + 300
while True:
    try:
        if get("/health")[0] == 200:
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit(f"make ui never answered at {base}")
    time.sleep(1)

status, page = get("/")
assert status == 200 and "<title>MLflow</title>" in page, page[:500]

query = urllib.parse.urlencode({"experiment_name": "ernie-pipeline"})
experiment = json.loads(get(f"/api/2.0/mlflow/experiments/get-by-name?{query}")[1])["experiment"]
runs = json.loads(get("/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]]})[1])["runs"]


def tags(run):
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
assert [p["info"]["run_id"] for p in parents] == [parent_id], (parent_id, [p["info"] for p in parents])
parent = parents[0]
assert parent["info"]["status"] == "FINISHED", parent["info"]
assert parent["info"]["run_name"].startswith("tiny-") and tags(parent)["conf"] == "tiny", parent["info"]
children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent_id]
assert {tags(c)["stage"] for c in children} == STAGES and len(children) == len(STAGES), [tags(c) for c in children]
for child in children:
    assert child["info"]["status"] == "FINISHED", child["info"]
    assert child["data"].get("metrics"), f"stage run {child['info']['run_name']} has no metrics"
print(
    f"MLflow UI at {base}: experiment {experiment['experiment_id']}, run {parent['info']['run_name']} FINISHED "
    f"with {len(children)} FINISHED stage runs: {', '.join(sorted(STAGES))}"
)
EOF
ui_s=$((SECONDS - ui_start))

echo "quickstart passed: make run ${run_s}s, make ui up and checked in ${ui_s}s, total $((SECONDS - start))s"
