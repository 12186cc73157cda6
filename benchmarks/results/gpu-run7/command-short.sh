#!/usr/bin/env bash
# The seventh GPU call cut to what the session's device time left allows (2026-12-07): the offloaded-checkpoint
# timing alone, then the curves of mixed's halves beside peft (9 processes at once). END: when the last stage must be
# done. The archive is rewritten after each stage, so a call stopped early still returns what finished.
B=benchmarks/gpu_run.sh; O=/tmp/r7; mkdir -p "$O"; S=$SECONDS; END=${END:-330}
pack() { tar czf "$OUT/run7.tgz" -C /tmp r7; }
(while true; do echo "$((SECONDS-S)) s: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader) | $(free -g | sed -n 2p)"; sleep 30; done) > "$O/monitor.log" 2>&1 & M=$!
$B "$O" install preset; pack
TIME_STEPS=6 timeout 130 $B "$O" time-offload; pack; cat "$O/time_offload.log"
CURVES_JOBS=9 timeout $((END-(SECONDS-S))) $B "$O" curves-ablation
kill $M; pack
cat "$O/stages.log"; grep -h "gap to peft\|FAILED" "$O/curves_ablation.log"; grep -c "^record" "$O/curves_ablation.log"
ls -la "$OUT"
