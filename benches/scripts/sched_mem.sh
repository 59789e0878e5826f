#!/usr/bin/env bash
# Memory and restart time with N scheduled messages (100-byte payloads),
# due DELAY from now: keelmq serve (1 shard) in a temp dir, RSS before and
# after, the timer's own memory estimate, then kill -9 and restart.
set -euo pipefail
N=${N:-1000000}; DELAY=${DELAY:-1h}; BIN=${BIN:-target/release/keelmq}  # run from the repository root after cargo build --release
D=$(mktemp -d); ADDR=127.0.0.1:7700
rss() { awk '/VmRSS/ {print $2}' /proc/$1/status; }
start() {
  local t0=$(date +%s%N)
  $BIN serve --data-dir $D/d --listen $ADDR --shards 1 > $D/log.$1 2>&1 &
  PID=$!
  until grep -q "serving on" $D/log.$1 2>/dev/null; do sleep 0.01; done
  echo "start $1: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  grep -o "timer: .*" $D/log.$1 | head -1
}
start 1
$BIN topic create s --queues 4 --broker $ADDR > /dev/null
R0=$(rss $PID)
python3 -c "
import sys
line = 'x' * 100 + '\n'
sys.stdout.write(line * $N)" | $BIN produce --topic s --delay $DELAY --broker $ADDR > /dev/null
sleep 3
R1=$(rss $PID)
$BIN stats --json --broker $ADDR | python3 -c "import json,sys; s=json.load(sys.stdin)['shards'][0]['schedule']; print('pending', s['pending'], 'timer memory_bytes', s['memory_bytes'], 'generation', s['generation'])"
echo "rss before ${R0} KiB, after ${R1} KiB: $(( (R1 - R0) / 1024 )) MiB for $N scheduled ($(( (R1 - R0) * 1024 / N )) bytes each)"
du -sh $D/d | cut -f1 | sed 's/^/data dir /'
kill -9 $PID; wait $PID 2>/dev/null || true
start 2
R2=$(rss $PID)
echo "rss after restart ${R2} KiB"
kill -9 $PID; wait $PID 2>/dev/null || true
rm -rf $D
