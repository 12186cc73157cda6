#!/usr/bin/env bash
# The GPU calls of 2026-12-07: run 7 ran (CALL=7 END=500 PROFILE=0; benchmarks/results/h100/run7), run 8 is next.
# Usage on the GPU machine, from the repository root, wheels in .whl/ (carry it):
# `CALL=8 END=580 bash benchmarks/gpu_calls.sh`. END (seconds): when the last stage must be done. The
# results come back as $OUT/runN.tgz, refreshed every 20 s so that a call cut by its limit still returns what was
# done; the monitor log samples GPU and host memory every 30 s.
#
# run 7: in parallel (none is a timing) the curves of mixed's halves beside peft, the 12 GiB fits of the
#   Llama-3.1-8B shape at 21,848 (native again: adapter casts now shared; the MLPs in blocks of the hidden width,
#   "+tiledmlp") and the 16 GiB fits at 40,724; then alone the profile of a 4096-token step (native, with token
#   blocks, with the hidden width's MLP blocks) and the step with and without offloaded checkpoints.
# run 8: in parallel peft's column under 12 and 16 GiB and `portable-kbit fit` (forecasts of the same
#   configurations under the same caps); then alone the MPS stand-in step at 8192 tokens and the profile of a
#   4096-token step with and without token blocks.
B=benchmarks/gpu_run.sh; CALL=${CALL:-7}; O=/tmp/r$CALL; mkdir -p "$O"; S=$SECONDS; END=${END:-580}
(while true; do echo "$((SECONDS-S)) s: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader) | $(free -g | sed -n 2p)"; sleep 30; done) > "$O/monitor.log" 2>&1 & M=$!
(while sleep 20; do tar czf "$OUT/.run.tgz" -C /tmp "r$CALL" 2>/dev/null && mv "$OUT/.run.tgz" "$OUT/run$CALL.tgz"; done) & A=$!
tree() { local c; for c in $(pgrep -P "$1"); do tree "$c"; done; echo "$1"; }
# wait for the background jobs, at most until `END - $1` seconds, then end them
wait_until() { while [ $((SECONDS-S)) -lt $((END-$1)) ] && { kill -0 $P1 || kill -0 $P2; } 2>/dev/null; do sleep 5; done
    for p in $P1 $P2; do kill $(tree $p) 2>/dev/null; done; sleep 3; }
left() { echo $((END-(SECONDS-S))); }
ALL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
case "$CALL" in
7)
    $B "$O" install preset
    (CURVES_JOBS=6 $B "$O" curves-ablation; FIT_JOBS=3 FIT_SUFFIX=-native FIT_LENGTHS=21848 \
        FIT_VARIANTS=native+blocks+offload,native+blocks+offload+tiledmlp,fp32+blocks+offload+tiledmlp $B "$O" consumer-fit-12) & P1=$!
    (FIT_LENGTHS=40724 $B "$O" preset-llama consumer-fit-16) & P2=$!
    if [ "${PROFILE:-1}" = 1 ]; then  # PROFILE=0 (a short call): the parallel part runs on, no profile
        wait_until 290
        PROFILE_VARIANTS=native,native+blocks,native+blocks+tiledmlp timeout $(($(left)-125)) $B "$O" profile
    else wait_until 125; fi
    TIME_STEPS=5 TIME_LENGTHS=4096,16384 TIME_VARIANTS=native+blocks,native+blocks+offload timeout $(left) $B "$O" time
    grep -h "gap to peft\|FAILED" "$O/curves_ablation.log"
    cat "$O"/fit16/long_fit.jsonl "$O"/fit12-native/long_fit.jsonl 2>/dev/null | cut -c1-300
    cat "$O"/profile/profile.jsonl 2>/dev/null | cut -c1-600; cat "$O"/time/long_sequences.md 2>/dev/null
    ;;
8)
    $B "$O" install preset preset-llama
    (FIT_SUFFIX=-peft FIT_VARIANTS=peft FIT_LENGTHS=1024,2048,3072 FIT_JOBS=3 $B "$O" consumer-fit-12 consumer-fit-16) & P1=$!
    (for cap in 12 16; do
        python3 -m portable_kbit fit llama-3.1-8b --device cuda:0 --budget ${cap}GiB --lora-rank 32 --lora-targets $ALL \
            --activations native+blocks+offload,fp32+blocks+offload \
            --seq-lens 16384,21848,32768,40724,61086 --json-out "$O/fit-forecast-$cap.jsonl" > "$O/fit-forecast-$cap.log" 2>&1
    done) & P2=$!
    wait_until 260
    timeout $(($(left)-130)) $B "$O" standin
    PROFILE_VARIANTS=native,native+blocks timeout $(left) $B "$O" profile
    cat "$O"/fit12-peft/long_fit.jsonl "$O"/fit16-peft/long_fit.jsonl 2>/dev/null | cut -c1-200
    tail -n 25 "$O"/fit-forecast-*.log; cat "$O"/mps_standin_step.jsonl 2>/dev/null | cut -c1-400
    ;;
esac
kill $M $A
cat "$O/stages.log"
tar czf "$OUT/run$CALL.tgz" -C /tmp "r$CALL"; ls -la "$OUT"
