#!/usr/bin/env bash
# The next GPU call (run 7), prepared 2026-12-07: in parallel (none is a timing) the curves of mixed's halves beside
# peft, the 12 GiB fits of the Llama-3.1-8B shape (native again: adapter casts now shared; and the MLPs in blocks of
# the hidden width, "+tiledmlp") and the 16 GiB fits; then alone the step times at 4096 and 16384 tokens: token
# blocks with the head's and with the hidden width's MLP blocks, and offloaded checkpoints. Run from the repository
# root on the GPU machine with the wheels in .whl/ (carry it); the archive comes back as $OUT/run7.tgz, refreshed
# every 20 s so that a call cut by its limit still returns what was done.
# END (seconds, default 580): when the last stage must be done; the parallel part ends 250 s before.
B=benchmarks/gpu_run.sh; O=/tmp/r7; mkdir -p "$O"; S=$SECONDS; END=${END:-580}
(while true; do echo "$((SECONDS-S)) s: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader) | $(free -g | sed -n 2p)"; sleep 30; done) > "$O/monitor.log" 2>&1 & M=$!
(while sleep 20; do tar czf "$OUT/.run7.tgz" -C /tmp r7 2>/dev/null && mv "$OUT/.run7.tgz" "$OUT/run7.tgz"; done) & A=$!
tree() { local c; for c in $(pgrep -P "$1"); do tree "$c"; done; echo "$1"; }
$B "$O" install preset
(CURVES_JOBS=6 $B "$O" curves-ablation; FIT_JOBS=3 FIT_SUFFIX=-native FIT_LENGTHS=21848,32768 \
    FIT_VARIANTS=native+blocks+offload,native+blocks+offload+tiledmlp,fp32+blocks+offload+tiledmlp $B "$O" consumer-fit-12) & P1=$!
(FIT_LENGTHS=40724,61086 $B "$O" preset-llama consumer-fit-16) & P2=$!
while [ $((SECONDS-S)) -lt $((END-250)) ] && { kill -0 $P1 || kill -0 $P2; } 2>/dev/null; do sleep 5; done
for p in $P1 $P2; do kill $(tree $p) 2>/dev/null; done; sleep 3
TIME_STEPS=6 TIME_LENGTHS=4096 TIME_VARIANTS=native timeout $((END-(SECONDS-S))) $B "$O" time
TIME_STEPS=6 TIME_LENGTHS=4096,16384 TIME_VARIANTS=native+blocks,native+blocks+tiledmlp,native+blocks+offload+tiledmlp \
    timeout $((END-(SECONDS-S))) $B "$O" time
kill $M $A
cat "$O/stages.log"; grep -h "gap to peft\|FAILED" "$O/curves_ablation.log"
cat "$O"/fit16/long_fit.jsonl "$O"/fit12-native/long_fit.jsonl 2>/dev/null | cut -c1-300
cat "$O"/time/long_sequences.md 2>/dev/null
tar czf "$OUT/run7.tgz" -C /tmp r7; ls -la "$OUT"
