#!/bin/bash
# Instructions per forwarded 4 KiB I/O (BENCHMARKS.md, issues 7 and 17), counted by
# valgrind's callgrind because this VM has no PMU. The measured server runs under callgrind,
# so it is the bottleneck and its reactor is busy nearly all the time: its instruction count
# divided by the commands it took (counted in the profile) is the work per I/O, polling
# included. For a breakdown: callgrind_annotate --inclusive=yes on the reactor thread's file.
# Runs the back server alone (malloc) once, then a front `nvme:` hop to a native back RUNS
# times (default 3). The hop's figure depends on how many commands each reactor pass finds
# (2 to 8 on a shared machine, from hour to hour), so its runs are also fitted as
# instructions = A x commands + B x passes (least squares; passes = the controller's polls):
# A is the work per command, B the work per pass, and both hold from hour to hour.
# Needs valgrind (apt-get install valgrind). Usage: scripts/bench-hop-instructions.sh [SECS]
# With VNVME_BIN=PATH it measures that binary (e.g. an older build, for an A/B) instead of
# building this tree's; with VNVME_BIN_B=PATH too, the hop runs alternate between the two
# and the ratios B/A are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
if [ -z "${VNVME_BIN:-}" ]; then
  cargo build --release -q -p vnvme
fi
BIN=${VNVME_BIN:-./target/release/vnvme}
D=$(mktemp -d /dev/shm/vnvme-hop.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
wait_sock() { for _ in $(seq 150); do [ -S "$1" ] && return; sleep 0.2; done; echo "no $1" >&2; exit 1; }
perf_ios() {
  RUST_LOG=warn $BIN perf "vfio-user:$1" -q 32 -o 4096 -w randread -t "$SECS" 2>/dev/null |
    awk -v s="$SECS" '/^Total/ {printf "%d", $3 * s; exit}'
}
# the reactor thread is the one with the most instructions
reactor_file() {
  grep -H '^summary' "$D"/cg."$1"-* | sort -t' ' -k2 -n | tail -1 | cut -d: -f1
}
# commands the server took (calls of a backend's `execute`, one per read or write; in a
# build before 2026-12-05 calls of the data-pointer walk), counted in the profile itself:
# the client's IOPS figure can miss I/Os done outside its window
# "commands passes": passes are the calls of the controller's poll
commands() {
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
def calls(match):
    ids, n, cur = set(), 0, None
    for line in text.splitlines():
        m = re.match(r'c?fn=\((\d+)\)(?: (.*))?', line)
        if m:
            if m.group(2) and match(m.group(2)):
                ids.add(m.group(1))
            cur = m.group(1) if line.startswith('cfn=') else None
            continue
        m = re.match(r'calls=(\d+)', line)
        if m and cur in ids:
            n += int(m.group(1))
        cur = None
    return n
names = ['Backend>::execute', 'backend::Backend::execute']
if not any(n in text for n in names):
    names = ['device_model::dptr::map_data']
cmds = calls(lambda f: any(n in f for n in names))
passes = calls(lambda f: f.endswith('Controller>::poll'))
print(cmds, passes)
PY
}
report() {
  local what=$1 pid=$2 ios=$3 f ir cmds passes
  f=$(reactor_file "$pid")
  ir=$(grep -h '^summary' "$f" | awk '{print $2}')
  read -r cmds passes < <(commands "$f")
  echo "bench $what | $ios I/Os by the client, $cmds commands, $passes passes," \
    "reactor $ir instructions, $((ir / cmds)) instructions per command"
  echo "$what $ir $cmds $passes" >>"$D/fit"
}
valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$D/cg.%p" \
  $BIN serve --unsupervised --socket "$D/back.sock" --ns malloc:1G >"$D/back.log" 2>&1 &
BACK=$!
wait_sock "$D/back.sock"
ios=$(perf_ios "$D/back.sock")
kill -INT $BACK; wait $BACK || true
report back-alone $BACK "$ios"

# one front hop run of binary $2, labelled $1
hop() {
  local label=$1 bin=$2 front
  $bin serve --unsupervised --socket "$D/back.sock" --ns malloc:1G >"$D/back.log" 2>&1 &
  local back=$!
  wait_sock "$D/back.sock"
  valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$D/cg.%p" \
    $bin serve --unsupervised --socket "$D/front.sock" --ns "nvme:vfio-user:$D/back.sock" \
    >"$D/front.log" 2>&1 &
  front=$!
  wait_sock "$D/front.sock"
  ios=$(perf_ios "$D/front.sock")
  kill -INT $front; wait $front || true
  kill -INT $back; wait $back || true
  rm -f "$D/back.sock" "$D/front.sock"
  report "$label" "$front" "$ios"
}
for _ in $(seq "${RUNS:-3}"); do
  hop front-hop "$BIN"
  if [ -n "${VNVME_BIN_B:-}" ]; then
    hop front-hop-B "$VNVME_BIN_B"
  fi
done
python3 - "$D/fit" <<'PY'
import collections, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    label, t, c, p = line.split()
    if label.startswith('front-hop'):
        rows[label].append((float(t), float(c), float(p)))
fits = {}
for label, r in rows.items():
    if len(r) < 2:
        continue
    scc = sum(c * c for _, c, _ in r); spp = sum(p * p for _, _, p in r)
    scp = sum(c * p for _, c, p in r)
    stc = sum(t * c for t, c, _ in r); stp = sum(t * p for t, _, p in r)
    det = scc * spp - scp * scp
    if det == 0:
        continue
    a = (stc * spp - stp * scp) / det
    b = (scc * stp - scp * stc) / det
    fits[label] = (a, b)
    per = ', '.join(f'{c / p:.1f}' for _, c, p in r)
    print(f'bench {label} fit | {a:.0f} instructions per command + {b:.0f} per pass '
          f'(commands per pass in its runs: {per}; at 5 per pass: {a + b / 5:.0f})')
if 'front-hop' in fits and 'front-hop-B' in fits:
    (a0, b0), (a1, b1) = fits['front-hop'], fits['front-hop-B']
    print(f'bench front-hop B/A | per command {a1 / a0:.3f}, per pass {b1 / b0:.3f}, '
          f'at 5 per pass {(a1 + b1 / 5) / (a0 + b0 / 5):.3f}')
PY
