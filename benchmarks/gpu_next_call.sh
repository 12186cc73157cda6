#!/usr/bin/env bash
# The next GPU call, prepared 2026-12-07 and not run yet (every start after run 6 was refused): the curves of mixed's
# halves beside peft, native under 12 GiB again (adapter casts now shared) and the 16 GiB fits of the Llama-3.1-8B
# shape in parallel (none is a timing), then the timings alone: offloaded checkpoints, mixed's halves. Run from the
# repository root on the GPU machine with the wheels in .whl/ (carry it); the archive comes back as $OUT/run7.tgz.
# END (seconds, default 570): when the last stage must be done; the parallel part ends 190 s before, the offload
# timing 55 s before.
B=benchmarks/gpu_run.sh; O=/tmp/r7; mkdir -p "$O"; S=$SECONDS; END=${END:-570}
(while true; do echo "$((SECONDS-S)) s: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader) | $(free -g | sed -n 2p)"; sleep 30; done) > "$O/monitor.log" 2>&1 & M=$!
# A call cut by its limit still returns what was done: the archive is refreshed every 20 s.
(while sleep 20; do tar czf "$OUT/.run7.tgz" -C /tmp r7 2>/dev/null && mv "$OUT/.run7.tgz" "$OUT/run7.tgz"; done) & A=$!
tree() { local c; for c in $(pgrep -P "$1"); do tree "$c"; done; echo "$1"; }
$B "$O" install preset
(CURVES_JOBS=6 $B "$O" curves-ablation; FIT_SUFFIX=-native FIT_VARIANTS=native+blocks+offload FIT_LENGTHS=21848,32768 $B "$O" consumer-fit-12) & P1=$!
(FIT_LENGTHS=40724,61086 $B "$O" preset-llama consumer-fit-16) & P2=$!
while [ $((SECONDS-S)) -lt $((END-190)) ] && { kill -0 $P1 || kill -0 $P2; } 2>/dev/null; do sleep 5; done
for p in $P1 $P2; do kill $(tree $p) 2>/dev/null; done; sleep 3
timeout $((END-55-(SECONDS-S))) $B "$O" time-offload
TIME_VARIANTS=native,mixed-attention timeout $((END-(SECONDS-S))) $B "$O" time-ablation
kill $M $A
cat "$O/stages.log"; grep -h "gap to peft\|FAILED" "$O/curves_ablation.log"
cat "$O"/fit16/long_fit.jsonl "$O"/fit12-native/long_fit.jsonl 2>/dev/null | cut -c1-300
cat "$O"/offload/long_sequences.md "$O"/ablation/long_sequences.md 2>/dev/null
tar czf "$OUT/run7.tgz" -C /tmp r7; ls -la "$OUT"
