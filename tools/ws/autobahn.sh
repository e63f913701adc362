#!/usr/bin/env bash
# Autobahn TestSuite conformance of shmrelay's websocket listener (issue 16): starts the relay
# with a websocket listener and the built-in echo worker, drives it with `kosoku` (PyPI: a
# Python 3 driver of the Autobahn case files), reads its report and exits non-zero when any
# case's verdict (behavior or behaviorClose) is other than OK, NON-STRICT or INFORMATIONAL,
# or when a case has no result.
#
#   tools/ws/autobahn.sh              # cases 1.* through 10.* (the full run: 301 cases, ~20 s)
#   tools/ws/autobahn.sh --ci         # 1.*-7.*, 10.* and the smaller 9.* cases (time-boxed for CI)
#   tools/ws/autobahn.sh -i '5.*' -i 6.2.1   # chosen cases (kosoku's -i globs)
#
# Options: --profile debug|release (default release; the binary is built if missing, or
# SHMRELAY_BIN names it), --out DIR (report directory, default target/autobahn), --timeout S
# (for the kosoku run, default 1800; --ci 600), --parallel N (cases run at once, default 1).
# Needs kosoku: `bash tools/ws/ci-setup.sh` makes the venv (SHMRELAY_WS_VENV, default
# target/ws-venv); the script runs it itself when kosoku is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
die() { echo "autobahn: $*" >&2; exit 1; }
# shellcheck source=../bench/lib.sh
. "$root/tools/bench/lib.sh"

profile=release
out=""
timeout_s=""
parallel=1
cases=()
ci=0
while [ $# -gt 0 ]; do
    case $1 in
        --ci) ci=1 ;;
        --profile) profile=$2; shift ;;
        --out) out=$2; shift ;;
        --timeout) timeout_s=$2; shift ;;
        --parallel) parallel=$2; shift ;;
        -i) cases+=("$2"); shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
if [ ${#cases[@]} -eq 0 ]; then
    if [ $ci = 1 ]; then
        # 9.* sends messages up to 16 MiB, in frames down to 64 bytes: its large cases take
        # most of a full run's time. CI keeps the 64 KiB-1 MiB sizes of each 9.* family.
        cases=('1.*' '2.*' '3.*' '4.*' '5.*' '6.*' '7.*' '10.*'
               '9.1.1' '9.1.2' '9.1.3' '9.2.1' '9.2.2' '9.2.3'
               '9.3.1' '9.4.1' '9.5.1' '9.5.2' '9.6.1' '9.6.2' '9.7.1' '9.7.2' '9.8.1' '9.8.2')
        timeout_s=${timeout_s:-600}
    else
        cases=('1.*' '2.*' '3.*' '4.*' '5.*' '6.*' '7.*' '9.*' '10.*') # there is no 8.*
    fi
fi
timeout_s=${timeout_s:-1800}
out=${out:-$root/target/autobahn}

venv=${SHMRELAY_WS_VENV:-$root/target/ws-venv}
if [ ! -x "$venv/bin/kosoku" ]; then
    echo "autobahn: no kosoku in $venv: running tools/ws/ci-setup.sh" >&2
    SHMRELAY_WS_VENV=$venv bash "$here/ci-setup.sh" >/dev/null
fi

if [ -n "${SHMRELAY_BIN:-}" ]; then
    bin=$SHMRELAY_BIN
else
    flag=()
    [ "$profile" = release ] && flag=(--release)
    (cd "$root" && cargo build -q "${flag[@]}" -p shmrelay --bin shmrelay)
    bin=${CARGO_TARGET_DIR:-$root/target}/$profile/shmrelay
fi
[ -x "$bin" ] || die "no shmrelay binary at $bin"

work=$(mktemp -d /tmp/shmrelay-autobahn.XXXXXX)
RELAY_PID=""
cleanup() {
    stop_pid "$RELAY_PID"
    rm -rf "$work"
}
trap cleanup EXIT

port=$(free_ports 1)
# 9.* echoes messages of up to 16 MiB: max_frame is that, the rings hold two of them
# (ring_capacity's default) and a client may have one whole echo queued (max_pending).
RUST_LOG=${RUST_LOG:-warn} start_ws_relay "$bin" "$work" "$port" "autobahn-$$" \
    'max_frame = 16777216' 'max_pending = 67108864'

include=()
for c in "${cases[@]}"; do include+=(-i "$c"); done
rm -rf "$out"
mkdir -p "$out"
echo "autobahn: kosoku ${cases[*]} against ws://127.0.0.1:$port (report in $out)" >&2
start=$(date +%s)
set +e
timeout "$timeout_s" "$venv/bin/kosoku" -m fuzzingclient -p "$parallel" -o "$out" \
    "${include[@]}" "ws://127.0.0.1:$port" >"$work/kosoku.log" 2>&1
rc=$?
set -e
took=$(( $(date +%s) - start ))
tail -n 30 "$work/kosoku.log" >&2
[ $rc = 124 ] && die "kosoku did not finish within ${timeout_s} s"
kill -0 "$RELAY_PID" 2>/dev/null || { cat "$work/relay.log" >&2; die "the relay died during the run"; }
[ -f "$out/index.json" ] || die "kosoku wrote no report (exit $rc)"

# kosoku exits 1 on any FAILED case, but NON-STRICT and INFORMATIONAL are passes here and
# UNIMPLEMENTED (compression, 12.*-13.*) is never selected: judge the report itself.
python3 - "$out/index.json" "$took" "${cases[@]}" <<'PY'
import collections, fnmatch, json, sys

path, took, patterns = sys.argv[1], sys.argv[2], sys.argv[3:]
report = json.load(open(path))
results = {case: r for agent in report.values() for case, r in agent.items()}
passing = {"OK", "NON-STRICT", "INFORMATIONAL"}
by_group = collections.defaultdict(collections.Counter)
bad = []
for case in sorted(results, key=lambda c: [int(x) for x in c.split(".")]):
    r = results[case]
    verdicts = (r.get("behavior"), r.get("behaviorClose"))
    group = case.split(".")[0]
    key = verdicts[0] if verdicts[1] in passing else f"{verdicts[0]} (close {verdicts[1]})"
    by_group[group][key] += 1
    if not all(v in passing for v in verdicts):
        bad.append(f"{case}: behavior={verdicts[0]} behaviorClose={verdicts[1]}")
unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(c, p) for c in results)]
print(f"autobahn: {len(results)} cases in {took} s")
for group in sorted(by_group, key=int):
    counts = ", ".join(f"{v} {n}" for v, n in sorted(by_group[group].items()))
    print(f"  {group}.*: {counts}")
for b in bad:
    print(f"  NOT PASSED {b}")
for p in unmatched:
    print(f"  NO RESULT for {p}")
ok = len(results) > 0 and not bad and not unmatched
print(f"{len(results) - len(bad)} passed, {len(bad)} failed")
sys.exit(0 if ok else 1)
PY
