#!/usr/bin/env bash
# The seventh GPU call cut to what 600 s of device time left allows (2026-12-07): the curves of mixed's halves
# beside peft (9 processes at once), then the offloaded-checkpoint timing alone. END: when the last stage must be done.
B=benchmarks/gpu_run.sh; O=/tmp/r7; mkdir -p "$O"; S=$SECONDS; END=${END:-400}
(while true; do echo "$((SECONDS-S)) s: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader) | $(free -g | sed -n 2p)"; sleep 30; done) > "$O/monitor.log" 2>&1 & M=$!
$B "$O" install preset
CURVES_JOBS=9 timeout $((END-150-(SECONDS-S))) $B "$O" curves-ablation
TIME_STEPS=6 timeout $((END-(SECONDS-S))) $B "$O" time-offload
kill $M
cat "$O/stages.log"; grep -h "gap to peft\|FAILED" "$O/curves_ablation.log"; grep -c "^record" "$O/curves_ablation.log"
cat "$O/time_offload.log"
tar czf "$OUT/run7.tgz" -C /tmp r7; ls -la "$OUT"
