#!/usr/bin/env bash
# Compare Plexus with llama.cpp (llama-bench) on the same model, threads and token counts.
#
# Runs ROUNDS rounds; each round runs llama-bench then `plexus bench` back to back
# (interleaved, so background load hits both alike). Measure only on a quiet machine.
#
# Environment (defaults in brackets):
#   MODEL     [../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf, relative to the repo root]
#   THREADS   [2]
#   ROUNDS    [3]
#   PLEXUS    [target/release/plexus]
#   LLAMA_ONLY=1  run only llama.cpp (no plexus binary needed)
#   ANCHORS   [~/.cache/anchors]  where llama.cpp is (or gets) built, see docs ANCHORS.md
#   OUTDIR    [mktemp -d]  raw JSON outputs of every run are kept here
#   PP, TG    [128, 64]  prompt and generated tokens (PP=512 for the pp512 figure)
#   DEPTH     [0]  positions of context before each measurement (llama-bench -d; plexus
#             bench --depth): DEPTH=512 measures decode on llama.cpp's split-KV path
#   LLAMA_BENCH  [the build under ANCHORS]  an llama-bench binary built elsewhere
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

MODEL="${MODEL:-../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-3}"
PLEXUS="${PLEXUS:-target/release/plexus}"
LLAMA_ONLY="${LLAMA_ONLY:-0}"
A="${ANCHORS:-$HOME/.cache/anchors}"
LLAMA_VERSION_PKG=0.3.36
LLAMA_SRC="$A/llama_cpp_python-$LLAMA_VERSION_PKG/vendor/llama.cpp"
LLAMA_BENCH="${LLAMA_BENCH:-$LLAMA_SRC/build/bin/llama-bench}"
PP="${PP:-128}"
TG="${TG:-64}"
DEPTH="${DEPTH:-0}"

die() { echo "error: $*" >&2; exit 1; }

[[ -f "$MODEL" ]] || die "model not found: $MODEL (set MODEL=...)"
if [[ "$LLAMA_ONLY" != 1 && ! -x "$PLEXUS" ]]; then
    die "plexus binary not found at '$PLEXUS': build it with 'cargo build --release' or set PLEXUS=...; \
set LLAMA_ONLY=1 to run only llama.cpp"
fi

build_llama_bench() {
    # As in ANCHORS.md ("Running llama.cpp here"). AMX must stay off (SIGILL in these VMs).
    echo "building llama-bench under $A (about 15-20 minutes on 2 cores)..." >&2
    mkdir -p "$A"
    [[ -x "$A/venv/bin/cmake" ]] || { python3 -m venv "$A/venv" && "$A/venv/bin/pip" install cmake; }
    if [[ ! -d "$LLAMA_SRC" ]]; then
        # Only llama-cpp-python itself must be an sdist; letting its build requirements come as
        # wheels avoids pip bootstrapping cmake from source just to read the sdist's metadata.
        "$A/venv/bin/pip" download --no-deps --no-binary llama-cpp-python -d "$A/dl" \
            "llama-cpp-python==$LLAMA_VERSION_PKG"
        tar xzf "$A/dl/llama_cpp_python-$LLAMA_VERSION_PKG.tar.gz" -C "$A"
    fi
    (
        cd "$LLAMA_SRC" && export PATH="$A/venv/bin:$PATH"
        cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
          -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
          -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
          -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release
        cmake --build build -j2 --target llama-bench
    )
}

if [[ ! -x "$LLAMA_BENCH" ]]; then
    build_llama_bench
    [[ -x "$LLAMA_BENCH" ]] || die "llama-bench still missing at $LLAMA_BENCH after the build"
else
    echo "reusing $LLAMA_BENCH" >&2
fi

OUTDIR="${OUTDIR:-$(mktemp -d /tmp/engine_vs_llamacpp.XXXXXX)}"
mkdir -p "$OUTDIR"

echo "date:    $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "machine: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), nproc $(nproc)"
echo "model:   $MODEL"
echo "threads: $THREADS, pp$PP / tg$TG at depth $DEPTH, rounds: $ROUNDS, raw outputs: $OUTDIR"
# Busy share of the CPUs over 2 s (the load average lags by minutes).
BUSY=$(python3 -c "
import time
def snap():
    v = [int(x) for x in open('/proc/stat').readline().split()[1:]]
    return sum(v), v[3] + v[4]
t1, i1 = snap(); time.sleep(2); t2, i2 = snap()
print(round(100 * (1 - (i2 - i1) / max(t2 - t1, 1))))")
echo "load:    $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min), CPU busy over the last 2 s: $BUSY%"
if (( BUSY > 10 )); then
    echo "warning: the machine is not quiet; llama.cpp's spinning threads make both figures unreliable" >&2
fi
echo "llama.cpp: $("$LLAMA_BENCH" --version 2>&1 | head -1 || true)"
echo

for r in $(seq 1 "$ROUNDS"); do
    "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p "$PP" -n "$TG" -d "$DEPTH" -o json \
        >"$OUTDIR/llama_$r.json" 2>"$OUTDIR/llama_$r.log" \
        || { tail -20 "$OUTDIR/llama_$r.log" >&2; die "llama-bench failed (round $r)"; }
    if [[ "$LLAMA_ONLY" != 1 ]]; then
        "$PLEXUS" bench --model "$MODEL" --threads "$THREADS" --prompt-tokens "$PP" --gen-tokens "$TG" --depth "$DEPTH" --json \
            >"$OUTDIR/plexus_$r.json" 2>"$OUTDIR/plexus_$r.log" \
            || { tail -20 "$OUTDIR/plexus_$r.log" >&2; die "plexus bench failed (round $r)"; }
    fi
    python3 - "$OUTDIR" "$r" "$PP" "$TG" <<'PY'
import json, os, sys
outdir, r, pp, tg = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def load_json(path):
    text = open(path).read().strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # tolerate log lines before the JSON
        return json.loads(text[min(i for i in (text.find("{"), text.find("[")) if i >= 0):])

ll = load_json(os.path.join(outdir, f"llama_{r}.json"))
l_pp = next(t["avg_ts"] for t in ll if t["n_prompt"] == pp and t["n_gen"] == 0)
l_tg = next(t["avg_ts"] for t in ll if t["n_prompt"] == 0 and t["n_gen"] == tg)
row = {"round": int(r), "llama_pp": l_pp, "llama_tg": l_tg}
print(f"round {r}:  {'':12s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak RSS MiB':>13s}")
print(f"           {'llama.cpp':12s} {l_pp:14.1f} {l_tg:13.1f} {'-':>13s}")
p = os.path.join(outdir, f"plexus_{r}.json")
if os.path.exists(p):
    px = load_json(p)
    row.update(plexus_pp=px["prefill_tok_s"], plexus_tg=px["decode_tok_s"])
    rss = px.get("peak_rss_bytes")
    rss_s = f"{rss / 2**20:13.1f}" if rss else f"{'-':>13s}"
    print(f"           {'plexus':12s} {px['prefill_tok_s']:14.1f} {px['decode_tok_s']:13.1f} {rss_s}")
    print(f"           {'ratio':12s} {px['prefill_tok_s'] / l_pp:14.2f} {px['decode_tok_s'] / l_tg:13.2f}")
with open(os.path.join(outdir, "rounds.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
PY
done

echo
python3 - "$OUTDIR" <<'PY'
import json, os, statistics, sys
rows = [json.loads(l) for l in open(os.path.join(sys.argv[1], "rounds.jsonl"))]
med = lambda xs: statistics.median(xs)
print(f"median over {len(rows)} rounds: llama.cpp pp {med([r['llama_pp'] for r in rows]):.1f} tok/s, "
      f"tg {med([r['llama_tg'] for r in rows]):.1f} tok/s")
px = [r for r in rows if "plexus_pp" in r]
if px:
    print(f"median over {len(px)} rounds: plexus    pp {med([r['plexus_pp'] for r in px]):.1f} tok/s, "
          f"tg {med([r['plexus_tg'] for r in px]):.1f} tok/s")
    print(f"median ratio plexus/llama.cpp: prefill {med([r['plexus_pp'] / r['llama_pp'] for r in px]):.2f}, "
          f"decode {med([r['plexus_tg'] / r['llama_tg'] for r in px]):.2f}")
PY
