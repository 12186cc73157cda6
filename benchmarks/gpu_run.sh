#!/usr/bin/env bash
# The GPU runs behind the committed H100 results, in the order they were made. Usage on the GPU machine, from the
# repository root, with bitsandbytes / optimum-quanto wheels in .whl/ (the machine has no network):
#   benchmarks/gpu_run.sh OUT_DIR STAGE...
# Stages: install, preset, phases, prepare-time, curves, attention, long-fit, long-fit-expandable, long-time,
# forecast, forecast-5steps, oom, fsdp-1gpu, pytest, pytest-bg (the tests in the background, to overlap GPU-bound
# stages), and pytest-since-run-2 (the test files whose code changed after the second run). Each writes into OUT_DIR;
# logs go to OUT_DIR/*.log. Runs 4 and 5 (2026-12-06): install preset oom forecast, then install preset oom and the
# whole suite (benchmarks/results/h100/run4, run5). Run 6 (2026-12-07): install preset time-modes time-offload
# curves-mixed preset-llama consumer-fit-12 (benchmarks/results/h100/run6). Timing stages take TIME_STEPS (8: single
# steps of run 6 ran up to 2.7x their median, and a median of 4 moved 16% between two processes of one variant).
set -uo pipefail
out="$1"; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
for stage in "$@"; do
    echo "== $(date +%T) stage $stage" | tee -a "$out/stages.log"
    case "$stage" in
    install)
        rm -rf /tmp/site  # a warm machine keeps what an earlier call installed
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, torch.cuda.get_device_name(0))"
        ;;
    preset)  # the Mistral-7B shape with random bf16 weights, built on the GPU, saved once
        python3 -m portable_kbit compare mistral-7b --build-preset --device cuda:0
        ;;
    phases)  # one fresh process per variant, one after the other (prepare() times need a quiet machine)
        python3 -m portable_kbit compare mistral-7b --device cuda:0 \
            --variants none,peft,ours-fp32,ours-fp32-upcast,ours-layer,ours-native,ours-peft,peft-noclear \
            --json-out "$out/phases.jsonl" > "$out/phases.log" 2>&1
        ;;
    curves)  # 3 data seeds x 40 steps x 4 variants, 6 processes at a time
        python3 benchmarks/loss_curves.py --preset mistral-7b --device cuda:0 --steps 40 --seeds 1,2,3 --jobs 6 \
            --out "$out" > "$out/curves.log" 2>&1
        ;;
    prepare-time)  # the preparation call alone, 5 fresh processes per variant, 4 at a time
        python3 benchmarks/prepare_time.py --preset mistral-7b --device cuda:0 --rounds 5 --jobs 4 --out "$out" \
            > "$out/prepare_time.log" 2>&1
        ;;
    attention)  # one attention call forward+backward at 2048-4096 tokens, per path
        python3 benchmarks/attention_fp32.py --device cuda --out "$out/attention_fp32.jsonl" > "$out/attention.log" 2>&1
        ;;
    long-fit)  # longest sequence under an 8 GiB cap, one fresh process per length, 8 at a time
        python3 benchmarks/long_sequences.py --preset mistral-7b --device cuda:0 --out "$out" --measure fit \
            --jobs 8 --coarse 1024 --fit-start 1024 --fit-stop 8192 > "$out/long_fit.log" 2>&1
        ;;
    long-fit-expandable)  # the same with expandable segments, for peft and each mode without blocks
        python3 benchmarks/long_sequences.py --preset mistral-7b --device cuda:0 --out "$out" --measure fit --append \
            --expandable --variants peft,fp32,layer,native --jobs 8 --coarse 1024 --fit-start 1024 --fit-stop 8192 \
            > "$out/long_fit_expandable.log" 2>&1
        ;;
    long-time)  # step time at 512 and 4096 tokens, with and without blocks, one process per variant
        python3 benchmarks/long_sequences.py --preset mistral-7b --device cuda:0 --out "$out" --measure time --append \
            --variants fp32,fp32+blocks,fp32+liger,layer,layer+blocks,native,native+blocks,native+liger \
            > "$out/long_time.log" 2>&1
        ;;
    forecast)
        python3 benchmarks/forecast_accuracy.py --preset mistral-7b --device cuda --out "$out" --timeout 300 --max-probes 6 \
            > "$out/forecast.log" 2>&1
        ;;
    forecast-5steps)  # the same, each probe training five steps (not run yet: the next GPU session's first)
        python3 benchmarks/forecast_accuracy.py --preset mistral-7b --device cuda --out "$out/forecast-5steps" \
            --timeout 300 --max-probes 6 --probe-steps 5 > "$out/forecast-5steps.log" 2>&1
        ;;
    preset-llama)  # the Llama-3.1-8B shape (vocabulary 128256, llama3 rope scaling), random bf16 weights
        python3 -m portable_kbit compare llama-3.1-8b --build-preset --device cuda:0
        ;;
    attention-blocks)  # one attention call per path at 1024-8192 tokens, Mistral's 32 / 8 heads
        python3 benchmarks/attention_blocks.py --device cuda --heads 32 --out "$out/attention_blocks.jsonl" \
            > "$out/attention_blocks.log" 2>&1
        ;;
    standin)  # a Mistral-7B training step at 8192 tokens with the MPS attention decisions: fused, math, query blocks
        python3 benchmarks/mps_standin_step.py --preset mistral-7b --device cuda --lengths 8192 --steps 2 \
            --paths "${STANDIN_PATHS:-fused,query-blocks,math}" \
            --out "$out" > "$out/standin.log" 2>&1
        ;;
    consumer-fit-8|consumer-fit-12|consumer-fit-16)  # Llama-3.1-8B, LoRA r32 on all linear layers, unsloth's lengths
        cap="${stage##*-}"
        case "$cap" in 8) lengths=2972,4096 ;; 12) lengths=21848,32768 ;; *) lengths=40724,61086 ;; esac
        python3 benchmarks/long_sequences.py --preset llama-3.1-8b --device cuda:0 --out "$out/fit$cap${FIT_SUFFIX:-}" \
            --measure fit --lora all-r32 --cap-gib "$cap" --steps 2 --jobs "${FIT_JOBS:-2}" \
            --fit-lengths "${FIT_LENGTHS:-$lengths}" ${FIT_EXPANDABLE:+--expandable} \
            --variants "${FIT_VARIANTS:-native+blocks+offload,fp32+blocks+offload}" > "$out/fit$cap${FIT_SUFFIX:-}.log" 2>&1
        ;;
    profile)  # where a 4096-token step's time goes, per variant (Mistral-7B shape)
        python3 benchmarks/profile_step.py --preset mistral-7b --device cuda:0 --seq-len 4096 --out "$out/profile" \
            --variants "${PROFILE_VARIANTS:-native,native+blocks,fp32,fp32+blocks}" > "$out/profile.log" 2>&1
        ;;
    offload-time)  # step time with and without offloaded checkpoints (Mistral-7B shape, uncapped)
        python3 benchmarks/long_sequences.py --preset mistral-7b --device cuda:0 --out "$out/offload" --measure time \
            --time-lengths "${TIME_LENGTHS:-4096}" \
            --variants "${TIME_VARIANTS:-native,native+offload,fp32,fp32+offload}" > "$out/offload_time.log" 2>&1
        ;;
    time-modes)  # step time at 4096 tokens per activations mode, with and without token blocks (Mistral-7B shape)
        python3 benchmarks/long_sequences.py --preset mistral-7b --device cuda:0 --out "$out/modes" --measure time \
            --steps "${TIME_STEPS:-8}" --time-lengths 4096 \
            --variants "${TIME_VARIANTS:-native,mixed,fp32,native+blocks,mixed+blocks,fp32+blocks}" \
            > "$out/time_modes.log" 2>&1
        ;;
    time-offload)  # offloaded checkpoints against the same step without, at 4096 and 16384 tokens (uncapped)
        python3 benchmarks/long_sequences.py --preset mistral-7b --device cuda:0 --out "$out/offload" --measure time \
            --steps "${TIME_STEPS:-8}" --time-lengths 4096,16384 --variants native+blocks,native+blocks+offload > "$out/time_offload.log" 2>&1
        ;;
    time-llama)  # step time, Llama-3.1-8B shape, LoRA r32 on all linear layers, under a TIME_CAP GiB cap
        python3 benchmarks/long_sequences.py --preset llama-3.1-8b --device cuda:0 --out "$out/${TIME_DIR:-time-llama}" \
            --measure time --append --lora all-r32 --cap-gib "${TIME_CAP:-12}" --cap-times --steps "${TIME_STEPS:-6}" \
            --time-lengths "${TIME_LENGTHS:-8192}" --variants "${TIME_VARIANTS:-native+blocks,native+blocks+offload}" \
            >> "$out/time_llama.log" 2>&1
        ;;
    time)  # step time, Mistral-7B shape, one process per variant: TIME_VARIANTS at TIME_LENGTHS into TIME_DIR
        python3 benchmarks/long_sequences.py --preset mistral-7b --device cuda:0 --out "$out/${TIME_DIR:-time}" \
            --measure time --append --steps "${TIME_STEPS:-8}" --time-lengths "${TIME_LENGTHS:-4096}" \
            --variants "${TIME_VARIANTS:-native,native+blocks,native+blocks+tiledmlp}" >> "$out/time.log" 2>&1
        ;;
    curves-mixed)  # 40-step loss curves of peft, fp32, mixed and native on 3 data seeds, 6 processes at a time
        python3 benchmarks/loss_curves.py --preset mistral-7b --device cuda:0 --steps 40 --seeds 1,2,3 --jobs 6 \
            --variants peft,ours-fp32,ours-mixed,ours-native --out "$out/curves" > "$out/curves.log" 2>&1
        ;;
    curves-ablation)  # the curves of peft and of mixed's two halves alone (which half moves the curve), 9 processes
        python3 benchmarks/loss_curves.py --preset mistral-7b --device cuda:0 --steps 40 --seeds 1,2,3 --jobs "${CURVES_JOBS:-9}" \
            --variants peft,ours-mixed-attention,ours-mixed-mlp --out "$out/curves-ablation" > "$out/curves_ablation.log" 2>&1
        ;;
    time-ablation)  # step time at 4096 tokens of mixed's two halves alone, beside native and mixed
        python3 benchmarks/long_sequences.py --preset mistral-7b --device cuda:0 --out "$out/ablation" --measure time \
            --steps "${TIME_STEPS:-8}" --time-lengths 4096 --variants "${TIME_VARIANTS:-native,mixed,mixed-attention,mixed-mlp}" \
            > "$out/time_ablation.log" 2>&1
        ;;
    oom)  # a real out-of-memory in the middle of prepare(upcast="peft")'s chunks: restored bit for bit
        python3 benchmarks/oom_midprepare.py --device cuda --out "$out/oom_midprepare.json" > "$out/oom.log" 2>&1
        ;;
    fsdp-1gpu)  # benchmarks/fsdp_qlora.py: the unsharded reference, then one rank under torchrun (nccl)
        python3 benchmarks/fsdp_qlora.py --single --preset mistral-7b --out "$out/fsdp" > "$out/fsdp.log" 2>&1 &&
            torchrun --standalone --nproc-per-node 1 benchmarks/fsdp_qlora.py --preset mistral-7b --out "$out/fsdp" \
                >> "$out/fsdp.log" 2>&1
        ;;
    pytest-since-run-2)
        python3 -m pytest -q -p no:cacheprovider tests/test_frozen_norms.py tests/test_forecast.py \
            tests/test_layer_mode.py tests/test_blocks.py tests/test_fsdp.py tests/test_attention.py \
            tests/test_devices.py tests/test_consumers.py tests/test_patch.py tests/test_cli.py \
            tests/test_oom_midprepare.py > "$out/pytest-cuda-since-run-2.log" 2>&1
        ;;
    pytest)
        python3 -m pytest -q -p no:cacheprovider tests > "$out/pytest-cuda.log" 2>&1
        ;;
    pytest-timed)  # the whole suite, stopped after PYTEST_SECONDS (what ran is in the log)
        timeout "${PYTEST_SECONDS:-420}" python3 -m pytest -q -p no:cacheprovider tests > "$out/pytest-cuda.log" 2>&1
        ;;
    pytest-bg)
        (python3 -m pytest -q -p no:cacheprovider tests > "$out/pytest-cuda.log" 2>&1; echo "pytest exit $?" \
            >> "$out/stages.log") &
        ;;
    *) echo "unknown stage $stage"; exit 2 ;;
    esac
    echo "== $(date +%T) stage $stage: exit $?" | tee -a "$out/stages.log"
done
