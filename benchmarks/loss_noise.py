"""How far apart are two identical peft runs on the tiny bnb-nf4 Llama, and how far is portable_kbit from peft?

The tests hold prepare(upcast="adjacent", activations="fp32") to peft's loss within 1e-3 at each of 5 steps
(tests/test_prepare.py). This prints the run-to-run spread of peft against itself next to our gap, per device,
so a failure can be told apart from kernel nondeterminism.

    python benchmarks/loss_noise.py --device cuda:0 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import warnings

warnings.filterwarnings("ignore")


def losses(variant: str, device: str) -> list[float]:
    import peft
    import torch

    import portable_kbit
    from portable_kbit.tools import tiny

    targets = tiny.LORA_TARGETS["llama"]
    model = tiny.load(tiny.checkpoint("llama"), "bnb-nf4", device)
    if variant == "peft":
        peft.prepare_model_for_kbit_training(model)
    else:
        portable_kbit.prepare(model, device, target_modules=targets, activations=variant)
    torch.manual_seed(0)
    return tiny.train_lora(model, targets, steps=5)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = {v: [losses(v, args.device) for _ in range(args.repeats)] for v in ("peft", "fp32", "native")}
    reference = runs["peft"][0]

    def gap(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) for x, y in zip(a, b, strict=True))

    print(
        json.dumps(
            {
                "device": args.device,
                "peft_vs_peft_max_gap": max(gap(r, reference) for r in runs["peft"][1:]) if args.repeats > 1 else None,
                "fp32_vs_peft_max_gap": max(gap(r, reference) for r in runs["fp32"]),
                "native_vs_peft_max_gap": max(gap(r, reference) for r in runs["native"]),
                "losses": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
