#!/usr/bin/env bash
# The GPU calls of 2026-12-07: run 7 ran (CALL=7 END=500 PROFILE=0), run 9 ran short (SHORT=1; results in
# benchmarks/results/h100/run7 and run9); run 8 ran on 2026-12-07 (run10: what run 9's full form adds), then run 10;
# runs 11 and 12 ran (benchmarks/results/h100/run11, run12); runs 14 and 13 ran (run14, run13; runs 15 and 16 were
# loss_curves.py commands typed in the call, see their READMEs); run 17 is next (`CALL=17 END=580`).
# Usage on the GPU machine, from the repository root, wheels in .whl/ (carry it):
# `CALL=8 END=580 bash benchmarks/gpu_calls.sh`. END (seconds): when the last stage must be done. The
# results come back as $OUT/runN.tgz, refreshed every 20 s so that a call cut by its limit still returns what was
# done; the monitor log samples GPU and host memory every 30 s.
#
# run 7: in parallel (none is a timing) the curves of mixed's halves beside peft, the 12 GiB fits of the
#   Llama-3.1-8B shape at 21,848 (native again: adapter casts now shared; the MLPs in blocks of the hidden width,
#   "+tiledmlp") and the 16 GiB fits at 40,724; then alone the profile of a 4096-token step (native, with token
#   blocks, with the hidden width's MLP blocks) and the step with and without offloaded checkpoints.
# run 8: in parallel (none is a timing) peft's column under 8, 12 and 16 GiB, the 8 GiB row of ours, the 1.5x aim
#   in native under 12 GiB (32,768), `portable-kbit fit`'s forecasts of the same configurations, then the 40-step
#   curves of the progressions task (peft, fp32, mixed, native; 3 seeds).
# run 9: alone, one process at a time: the 4096-token step of fp32, layer and mixed with and without token blocks
#   (the MLP rule of a693a79), the MPS stand-in step at 8192 tokens, the Llama-3.1-8B step under 12 GiB with and
#   without offloaded checkpoints at the longest length that fits without (of 8192, 12,288, 16,384), and one
#   attention call per path (attention_blocks.py).
B=benchmarks/gpu_run.sh; CALL=${CALL:-7}; O=/tmp/r$CALL; mkdir -p "$O"; S=$SECONDS; END=${END:-580}
# the commands typed here (forecasts, curves) import the wheels the install stage puts in /tmp/site, and the
# checkout (run 11's first call lost its forecasts and curves without this)
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
(while true; do echo "$((SECONDS-S)) s: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader) | $(free -g | sed -n 2p)"; sleep 30; done) > "$O/monitor.log" 2>&1 & M=$!
(while sleep 20; do tar czf "$OUT/.run.tgz" -C /tmp "r$CALL" 2>/dev/null && mv "$OUT/.run.tgz" "$OUT/run$CALL.tgz"; done) & A=$!
tree() { local c; for c in $(pgrep -P "$1"); do tree "$c"; done; echo "$1"; }
# wait for the background jobs, at most until `END - $1` seconds, then end them
running() { local p; for p in $PS; do kill -0 $p 2>/dev/null && return 0; done; return 1; }
wait_until() { while [ $((SECONDS-S)) -lt $((END-$1)) ] && running; do sleep 5; done
    for p in $PS; do kill $(tree $p) 2>/dev/null; done; sleep 3; }
left() { echo $((END-(SECONDS-S))); }
ALL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
# `portable-kbit fit` for the offloaded configurations of the consumer table: cap (GiB), lengths
forecast() {
    python3 -m portable_kbit fit llama-3.1-8b --device cuda:0 --budget "${1}GiB" --lora-rank 32 --lora-targets $ALL \
        --activations native+blocks+offload,fp32+blocks+offload \
        --seq-lens "$2" --json-out "$O/fit-forecast-$1.jsonl" > "$O/fit-forecast-$1.log" 2>&1
}
# the three caps in parallel, 12 and 16 GiB at the lengths $1, added to the jobs wait_until waits for
forecasts() { local cap
    for cap in 8 12 16; do
        if [ $cap = 8 ]; then forecast $cap 512,1024,2048,2972 & else forecast $cap "$1" & fi
        PS="$PS $!"
    done
}
case "$CALL" in
7)
    $B "$O" install preset
    (CURVES_JOBS=6 $B "$O" curves-ablation; FIT_JOBS=3 FIT_SUFFIX=-native FIT_LENGTHS=21848 \
        FIT_VARIANTS=native+blocks+offload,native+blocks+offload+tiledmlp,fp32+blocks+offload+tiledmlp $B "$O" consumer-fit-12) & PS=$!
    (FIT_LENGTHS=40724 $B "$O" preset-llama consumer-fit-16) & PS="$PS $!"
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
    $B "$O" install preset-llama
    (export FIT_SUFFIX=-peft FIT_VARIANTS=peft FIT_JOBS=3
        FIT_LENGTHS=1024,2048,3072 $B "$O" consumer-fit-12; FIT_JOBS=2 FIT_LENGTHS=2048,3072 $B "$O" consumer-fit-16
        FIT_SUFFIX= FIT_VARIANTS= FIT_LENGTHS=2972,4096,6144 $B "$O" consumer-fit-8
        FIT_LENGTHS=512,1024,2048 $B "$O" consumer-fit-8
        FIT_SUFFIX=-aim FIT_VARIANTS=native+blocks+offload FIT_LENGTHS=32768 FIT_JOBS=1 $B "$O" consumer-fit-12) & PS=$!
    (forecast 8 2048,2972,4096,6144
        for cap in 12 16; do forecast $cap 8192,16384,21848,32768,40724,61086; done) & PS="$PS $!"
    ($B "$O" preset; python3 benchmarks/loss_curves.py --preset mistral-7b --device cuda:0 --task progressions --steps 40 --seq-len 256 \
        --seeds 1,2,3 --jobs 3 --variants peft,ours-fp32,ours-mixed,ours-native --out "$O/curves-progressions" \
        > "$O/curves_progressions.log" 2>&1) & PS="$PS $!"
    wait_until 10
    for d in fit8-peft fit12-peft fit16-peft fit8 fit12-aim; do grep -h '"phase": "fit"' "$O/$d/long_fit.jsonl" | cut -c1-200; done
    tail -n 12 "$O"/fit-forecast-*.log; grep -h "gap to peft" "$O/curves_progressions.log"
    ;;
9)  # SHORT=1 (a call of END < 560 s): the 4096-token modes and the stand-in only (no Llama preset, offload, attention)
    if [ "${SHORT:-0}" = 1 ]; then $B "$O" install preset; else $B "$O" install preset preset-llama; fi
    TIME_STEPS=5 TIME_DIR=modes TIME_VARIANTS=${MODES:-fp32,fp32+blocks,mixed,mixed+blocks,layer,layer+blocks} \
        timeout $(($(left)-${MODES_LEAVE:-330})) $B "$O" time
    timeout $(($(left)-${STANDIN_LEAVE:-190})) $B "$O" standin
    if [ "${SHORT:-0}" != 1 ]; then
        # the longest length without offload under 12 GiB (8192 trained, 12,288 ran out before the shared adapter casts)
        FIT_SUFFIX=-nooffload FIT_VARIANTS=native+blocks FIT_LENGTHS=12288,16384 FIT_JOBS=2 timeout 90 $B "$O" consumer-fit-12
        n=8192; for m in 12288 16384; do
            grep '"fits": true' "$O/fit12-nooffload/long_fit.jsonl" 2>/dev/null | grep -q "\"seq_len\": $m," && n=$m
        done
        TIME_LENGTHS=$n timeout $(($(left)-25)) $B "$O" time-llama
        timeout $(left) $B "$O" attention-blocks
    fi
    cat "$O"/modes/long_sequences.md "$O"/time-llama/long_sequences.md; cut -c1-400 "$O"/mps_standin_step.jsonl
    cut -c1-300 "$O"/attention_blocks.jsonl
    ;;
10) # the forecasts again, now that the fake step sees offloaded inputs leave the device (caps 8, 12, 16 in
    # parallel), beside the 8 GiB row's short lengths and peft under 8 GiB (its run 8 record lost to a harness bug)
    $B "$O" install preset-llama
    forecasts 8192,16384,21848,32768,40724,61086
    (FIT_SUFFIX=-short FIT_LENGTHS=512,1024,2048 FIT_JOBS=2 $B "$O" consumer-fit-8
        FIT_SUFFIX=-peft FIT_VARIANTS=peft FIT_LENGTHS=512 FIT_JOBS=1 $B "$O" consumer-fit-8) & PS="$PS $!"
    wait_until 10
    for d in fit8-short fit8-peft; do grep -h '"phase": "fit"' "$O/$d/long_fit.jsonl" | cut -c1-200; done
    tail -n 6 "$O"/fit-forecast-*.log
    ;;
11) # next: alone first (timings), one attention call per path with the query blocks of 4f6534c and the MPS
    # stand-in's query-blocks step at 8192 tokens; then in parallel the forecasts with 2 and 3 layers sampled (bb11dc2,
    # ef55656; caps 8, 12 and 16, beside the fits of runs 6-10: benchmarks/consumer_gpus.py --forecasts) and the
    # one-sequence curves of mixed with peft run twice per seed (its own spread, the yardstick of issue 23's bar),
    # and of fp32 and mixed with TF32 matmuls (prepare(tf32=True)).
    $B "$O" install preset-llama preset
    timeout 90 $B "$O" attention-blocks
    STANDIN_PATHS=query-blocks timeout 150 $B "$O" standin
    forecasts 8192,12288,16384,21848,32768,40724
    (python3 benchmarks/loss_curves.py --preset mistral-7b --device cuda:0 --steps 40 --seeds 1,2,3 --jobs 6 \
        --variants peft,peft#2,ours-fp32,ours-mixed,ours-fp32-tf32,ours-mixed-tf32 --out "$O/curves-repeat" \
        > "$O/curves_repeat.log" 2>&1) & PS="$PS $!"
    wait_until 10
    tail -n 6 "$O"/fit-forecast-*.log; cut -c1-300 "$O"/attention_blocks.jsonl "$O"/mps_standin_step.jsonl
    grep -h "gap to peft\|peft's curve" "$O/curves_repeat.log"
    ;;
12) # TF32 (prepare(tf32=True)): alone, the 4096-token step of native, fp32 and mixed with and without it; then the
    # 40-step curves of the progressions task with peft twice per seed
    $B "$O" install preset
    TIME_STEPS=5 TIME_DIR=tf32 TIME_VARIANTS=native,fp32,fp32+tf32,mixed,mixed+tf32 timeout $(($(left)-240)) $B "$O" time
    (python3 benchmarks/loss_curves.py --preset mistral-7b --device cuda:0 --task progressions --steps 40 \
        --seeds 1,2,3 --jobs 5 --variants peft,peft#2,ours-fp32,ours-fp32-tf32,ours-mixed-tf32 \
        --out "$O/curves-tf32-progressions" > "$O/curves_tf32_progressions.log" 2>&1) & PS="$PS $!"
    wait_until 10
    cat "$O"/tf32/long_sequences.md; grep -h "gap to peft\|peft's curve" "$O/curves_tf32_progressions.log"
    ;;
13) # after run 14, on the warm machine: alone, the 4096-token step of native and mixed, three rounds in turn (is mixed
    # within 1.15x of native with lm_head from bf16 parts: run 10 said 1.15x, run 12 1.19x before them), then fp32
    $B "$O" install preset
    for round in 1 2 3; do
        TIME_STEPS=5 TIME_DIR=modes-$round TIME_VARIANTS=native,mixed timeout 90 $B "$O" time
    done
    TIME_STEPS=5 TIME_DIR=modes-fp32 TIME_VARIANTS=fp32 timeout $(left) $B "$O" time
    cat "$O"/modes-*/long_sequences.md
    ;;
14) # next: lm_head from bf16 parts checked and timed; then the 12 and 16 GiB fits again with the norms in token
    # blocks (0142a41), beside `fit`'s forecasts of the same code (layers sampled until their growth settles, 68854c9)
    $B "$O" install preset-llama
    # first, alone: lm_head from bf16 parts on the GPU (the tests, then its time and error against fp32 and TF32)
    python3 -m pytest -q -p no:cacheprovider tests/test_fp32_from_bf16.py > "$O/pytest_fp32_from_bf16.log" 2>&1
    tail -n 3 "$O/pytest_fp32_from_bf16.log"
    timeout 60 python3 benchmarks/head_matmuls.py --device cuda --tokens 4096,8192 --out "$O/head_matmuls.jsonl" \
        > "$O/head_matmuls.log" 2>&1; cut -c1-160 "$O/head_matmuls.log"
    # one process per configuration and cap (a fit of the 8B shape takes minutes): native tries the aim under 12 GiB
    # after unsloth's length; fp32 under 12 GiB and both under 16 GiB only unsloth's lengths (the call's time)
    (FIT_JOBS=1 FIT_SUFFIX=-native FIT_LENGTHS=21848,32768 FIT_VARIANTS=native+blocks+offload \
        $B "$O" consumer-fit-12) & PS=$!
    (FIT_JOBS=1 FIT_SUFFIX=-fp32 FIT_LENGTHS=21848 FIT_VARIANTS=fp32+blocks+offload $B "$O" consumer-fit-12) & PS="$PS $!"
    (FIT_JOBS=2 FIT_LENGTHS=40724 $B "$O" consumer-fit-16) & PS="$PS $!"
    forecasts 21848,32768,40724
    wait_until 10
    for d in fit12-native fit12-fp32 fit16; do grep -h '"phase": "fit"' "$O/$d/long_fit.jsonl" | cut -c1-200; done
    tail -n 6 "$O"/fit-forecast-*.log
    ;;
17) # next: 1.5x unsloth's 16 GB length in native (61,086 under 16 GiB; `fit` puts it near 0.92 of the cap), and
    # beside it the progressions curves of fp32 and mixed with peft twice (issue 23: is mixed's gap on this task
    # within peft's own spread on every seed; six processes, curves are not timings)
    $B "$O" install preset preset-llama
    (FIT_JOBS=1 FIT_SUFFIX=-native FIT_LENGTHS=61086 FIT_VARIANTS=native+blocks+offload $B "$O" consumer-fit-16) & PS=$!
    (python3 benchmarks/loss_curves.py --preset mistral-7b --device cuda:0 --task progressions --steps 40 \
        --seq-len 256 --seeds 1,2,3 --jobs 6 --variants peft,peft#2,ours-fp32,ours-mixed \
        --out "$O/curves-progressions" > "$O/curves_progressions.log" 2>&1) & PS="$PS $!"
    wait_until 10
    grep -h '"phase": "fit"' "$O/fit16-native/long_fit.jsonl" | cut -c1-200
    grep -h "gap to peft\|peft's curve" "$O/curves_progressions.log"
    ;;
esac
kill $M $A
cat "$O/stages.log"
tar czf "$OUT/run$CALL.tgz" -C /tmp "r$CALL"; ls -la "$OUT"
