"""Token blocks (prepare(token_blocks=...)): the head + loss and the MLPs in blocks give the unblocked loss and adapter
gradients, leave outputs without labels alone, are undone by token_blocks=None, and save the memory they are for.

Equality is checked on fp32 models built from configs (CPU fp32 numerics, 1e-5; the issue's CI target is 1e-3), with
random LoRA weights so that every adapter gradient is non-zero: Llama with a padded batch and ignored tokens, tied
embeddings, Gemma 2 with final-logit soft-capping, Mixtral (MoE: router logits and auxiliary loss),
num_items_in_batch, shift_labels, both checkpointing variants; one bitsandbytes nf4 model per activations mode.
"""

from __future__ import annotations

import copy
import functools
import math

import model_state
import pytest
import torch
import transformers
from conftest import bitsandbytes_supports
from peft import LoraConfig, get_peft_model
from transformers.modeling_outputs import CausalLMOutputWithPast

import portable_kbit
from portable_kbit.backends.base import Backend
from portable_kbit.patches.token_blocks import plan as blocks
from portable_kbit.tools import tiny

TOLERANCE = 1e-5
BLOCK = 8  # tokens per block: the test sequences (40 tokens, 2 rows) make 10 blocks
TARGETS = ["q_proj", "v_proj"]
CHECKPOINTING = {"use_reentrant": False}


def config(arch: str, **overrides):
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "gemma2":
        return transformers.Gemma2Config(head_dim=32, final_logit_softcapping=2.0, **common)
    if arch == "mixtral":
        return transformers.MixtralConfig(
            num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5, **common
        )
    raise ValueError(arch)


def build(arch: str, **overrides):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config(arch, **overrides), dtype=torch.float32)


def batch(vocab: int = 256, rows: int = 2, length: int = 40):
    """A padded batch with ignored tokens: row 0 has an ignored prompt, row 1 ten padding positions."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, length), generator=generator)
    labels = ids.clone()
    labels[0, :7] = -100
    mask = torch.ones_like(ids)
    if rows > 1:
        labels[1, 30:] = -100
        mask[1, 30:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_step(model, token_blocks, inputs, checkpointing=CHECKPOINTING, **prepare_kwargs):
    """prepare() a copy, attach random LoRA weights (the same each time), one forward and backward."""
    model = copy.deepcopy(model)
    portable_kbit.prepare(
        model,
        target_modules=TARGETS,
        token_blocks=token_blocks,
        gradient_checkpointing_kwargs=checkpointing,
        **prepare_kwargs,
    )
    torch.manual_seed(5)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False))
    model.train()
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads, model


def calls(model) -> dict:
    """What token blocks did since prepare(): report(model).token_block_calls (the PeftModel's or its base's)."""
    done = portable_kbit.report(model)
    if done is None and hasattr(model, "get_base_model"):
        done = portable_kbit.report(model.get_base_model())
    assert done is not None and done.token_block_calls is not None, "no token blocks on this model"
    return done.token_block_calls.to_dict()


def assert_blocking_ran(model, mlp_calls: int = 2) -> None:
    """The head and loss ran in blocks for every call, and at least `mlp_calls` MLP calls did (a checkpointed
    layer's MLP runs twice per step), none whole."""
    counts = calls(model)
    assert counts["head and loss"] == {"blocked": 1, "whole": {}}, counts
    if mlp_calls:
        assert counts["MLPs"]["blocked"] >= mlp_calls and not counts["MLPs"]["whole"], counts


def assert_same_step(plain, blocked, tolerance=TOLERANCE):
    (out_a, grads_a, _), (out_b, grads_b, _) = plain, blocked
    assert abs(out_a.loss.item() - out_b.loss.item()) <= tolerance, (out_a.loss.item(), out_b.loss.item())
    assert grads_a.keys() == grads_b.keys()
    assert all(g.abs().max() > 0 for g in grads_a.values()), "every adapter gradient should be non-zero"
    worst = max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a)
    assert worst <= tolerance, f"largest adapter gradient difference {worst}"


# ---- the same loss and gradients ----------------------------------------------------------------------------------


CASES = {
    "llama, padded with ignored tokens": ("llama", {}, {}),
    "tied embeddings": ("llama", {"tie_word_embeddings": True}, {}),
    "gemma2 soft-capping": ("gemma2", {}, {}),
    "num_items_in_batch": ("llama", {}, {"num_items_in_batch": torch.tensor(57)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_blocked_step_equals_plain(case):
    arch, overrides, extra = CASES[case]
    model = build(arch, **overrides)
    inputs = {**batch(), **extra}
    plain = train_step(model, None, inputs)
    blocked = train_step(model, BLOCK, inputs)
    assert_same_step(plain, blocked)
    assert_blocking_ran(blocked[2])
    done = portable_kbit.report(blocked[2].get_base_model())
    assert done.token_blocks == BLOCK and done.token_blocks_source == "argument"
    assert done.blocked_head == "lm_head"
    assert done.blocked_mlps == ["model.layers.0.mlp", "model.layers.1.mlp"]
    # every norm of the hidden states runs in blocks too, each call (the layers' twice: forward and recompute)
    assert {"model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"} <= set(
        done.blocked_norms
    )
    norm_calls = calls(blocked[2])["norms"]
    assert norm_calls["blocked"] >= len(done.blocked_norms) and not norm_calls["whole"], norm_calls
    if arch == "gemma2":  # the soft-capping, found by behaviour, replayed on each block
        assert done.logit_transform == ["div", "tanh", "mul"]
    assert blocked[0].logits is None and plain[0].logits is not None


def test_shift_labels():
    model = build("llama")
    inputs = batch()
    labels = inputs.pop("labels")
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()  # as collators make them
    inputs = {**inputs, "labels": labels, "shift_labels": shifted}
    blocked = train_step(model, BLOCK, inputs)
    assert_same_step(train_step(model, None, inputs), blocked)
    assert_blocking_ran(blocked[2])


@pytest.mark.parametrize("reentrant", [False, True])
def test_moe_router_logits_and_auxiliary_loss(reentrant):
    model = build("mixtral")
    inputs = batch()
    checkpointing = {"use_reentrant": reentrant}
    plain = train_step(model, None, inputs, checkpointing)
    blocked = train_step(model, BLOCK, inputs, checkpointing)
    assert_same_step(plain, blocked)
    assert_blocking_ran(blocked[2])
    assert abs(plain[0].aux_loss.item() - blocked[0].aux_loss.item()) <= TOLERANCE
    # one merged entry per layer, as without blocks (the router runs once per block)
    assert len(blocked[0].router_logits) == len(plain[0].router_logits) == 2
    for a, b in zip(plain[0].router_logits, blocked[0].router_logits, strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=TOLERANCE)
    done = portable_kbit.report(blocked[2].get_base_model())
    # the sparse MoE blocks ("mlp" from transformers 5, "block_sparse_moe" in 4.x)
    assert [n.rsplit(".", 1)[0] for n in done.blocked_mlps] == ["model.layers.0", "model.layers.1"]


@pytest.mark.parametrize("activations", ["fp32", "native"])
def test_quantized_model(backend, device, activations):
    if not bitsandbytes_supports(backend):
        pytest.skip(f"bitsandbytes does not run on {backend}")
    model = tiny.load(tiny.checkpoint("llama"), "bnb-nf4", device)
    inputs = {k: v.to(device) for k, v in batch().items()}
    plain = train_step(model, None, inputs, activations=activations)
    blocked = train_step(model, BLOCK, inputs, activations=activations)
    # on the CPU the same kernels on the same rows, only the order of the loss sum differs; on a GPU a block is a
    # matmul of another shape, for which cuBLAS picks another kernel (H100: gradients 4.7e-4 apart, run 5)
    assert_same_step(plain, blocked, tolerance=1e-4 if backend == "cpu" else 1e-3)
    assert_blocking_ran(blocked[2])


HEADS = {
    # prepare() on a PeftModel whose head is trained in full (a trainable copy in peft's wrapper)
    "modules_to_save": (["q_proj", "v_proj"], ["lm_head"], False),
    # LoRA on the head, attached after prepare(): the hooked head is the one called, looked up on each call
    "LoRA on lm_head": (["q_proj", "v_proj", "lm_head"], None, True),
}


@pytest.mark.parametrize("case", list(HEADS))
def test_trained_head(case):
    targets, to_save, prepare_first = HEADS[case]
    model = build("llama")
    inputs = batch()

    def step(token_blocks):
        config = LoraConfig(r=4, target_modules=targets, modules_to_save=to_save, init_lora_weights=False)
        prepared = copy.deepcopy(model)
        kwargs = dict(token_blocks=token_blocks, gradient_checkpointing_kwargs=CHECKPOINTING)
        torch.manual_seed(5)
        if prepare_first:
            portable_kbit.prepare(prepared, target_modules=targets, **kwargs)
            torch.manual_seed(5)
            prepared = get_peft_model(prepared, config)
        else:
            prepared = get_peft_model(prepared, config)
            portable_kbit.prepare(prepared, **kwargs)
        prepared.train()
        out = prepared(**inputs)
        out.loss.backward()
        return out, {n: p.grad.detach().clone() for n, p in prepared.named_parameters() if p.requires_grad}, prepared

    plain, blocked = step(None), step(BLOCK)
    assert_same_step(plain, blocked)
    assert_blocking_ran(blocked[2])
    assert any("lm_head" in name for name in blocked[1]) and blocked[0].logits is None


# ---- without labels, and in eval mode: nothing changes ----------------------------------------------------------


def test_outputs_without_labels_or_in_eval_mode_are_unchanged():
    model = build("llama")
    inputs = batch()
    plain = copy.deepcopy(model)
    portable_kbit.prepare(plain, target_modules=TARGETS, token_blocks=None)
    blocked = copy.deepcopy(model)
    portable_kbit.prepare(blocked, target_modules=TARGETS, token_blocks=BLOCK)
    unlabelled = {k: v for k, v in inputs.items() if k != "labels"}
    for mode in ("train", "eval"):
        for m in (plain, blocked):
            getattr(m, mode)()
        with torch.no_grad():
            a, b = plain(**unlabelled), blocked(**unlabelled)
        assert b.logits is not None and torch.equal(a.logits, b.logits), mode
    with torch.no_grad():  # eval mode with labels (Trainer's evaluation): full logits and transformers' loss
        a, b = plain(**inputs), blocked(**inputs)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    counts = calls(blocked)
    assert counts["head and loss"] == {"blocked": 0, "whole": {"no labels": 1, "eval mode": 2}}, counts
    # the MLPs run in blocks in training mode, labels or not (the unlabelled training-mode call: 2 layers)
    assert counts["MLPs"] == {"blocked": 2, "whole": {"eval mode": 4}}, counts
    generated = [m.generate(inputs["input_ids"][:1, :8], max_new_tokens=3, do_sample=False) for m in (plain, blocked)]
    assert torch.equal(*generated)


def test_auto_blocks_only_calls_longer_than_a_block():
    model = build("llama")
    portable_kbit.prepare(
        model, target_modules=TARGETS, token_blocks="auto", gradient_checkpointing_kwargs=CHECKPOINTING
    )
    size = portable_kbit.report(model).token_blocks
    assert size is not None and size >= Backend.min_block_tokens
    model.train()
    short = batch(length=size // 2, rows=1)
    assert model(**short).logits is not None  # one block: the head and transformers' loss as usual
    assert calls(model)["head and loss"] == {"blocked": 0, "whole": {"one block or fewer tokens": 1}}
    long = batch(length=size + 8, rows=1)
    assert model(**long).logits is None
    assert calls(model)["head and loss"] == {"blocked": 1, "whole": {"one block or fewer tokens": 1}}
    assert calls(model)["MLPs"]["blocked"] == 2 and calls(model)["MLPs"]["whole"] == {"one block or fewer tokens": 2}


def test_trainer_trains_and_evaluates_with_full_logits(tmp_path):
    model = build("llama")
    portable_kbit.prepare(
        model, target_modules=TARGETS, token_blocks=BLOCK, gradient_checkpointing_kwargs=CHECKPOINTING
    )
    model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.0))
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row, "labels": row} for row in ids.tolist()]
    seen = []

    def metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"seen": 1.0}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none", use_cpu=True
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=rows, eval_dataset=rows, compute_metrics=metrics
    )
    trainer.train()
    losses = [e["train_loss"] for e in trainer.state.log_history if "train_loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    result = trainer.evaluate()
    assert math.isfinite(result["eval_loss"]) and seen == [(4, 24, 256)]  # evaluation is not blocked


# ---- what cannot be blocked -----------------------------------------------------------------------------------------


class SlicedVocabLlama(transformers.LlamaForCausalLM):
    """A model that slices its logits before the loss (as Inkling does with unpadded_vocab_size): not elementwise."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = self.lm_head(hidden)[..., :200]
        loss = None if labels is None else self.loss_function(logits=logits, labels=labels, vocab_size=200)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def sliced_model():
    torch.manual_seed(0)
    return SlicedVocabLlama(config("llama"))


def custom_loss_model():
    model = build("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.float().mean()
    return model


@pytest.mark.parametrize("make", [sliced_model, custom_loss_model], ids=["sliced logits", "custom loss_function"])
def test_explicit_size_refused_where_the_loss_cannot_be_blocked(make):
    model = make()
    before = model_state.take(model)
    with pytest.raises(ValueError, match=r"token_blocks=64: the output head and loss of this model cannot run"):
        portable_kbit.prepare(model, target_modules=TARGETS, token_blocks=64)
    model_state.assert_unchanged(before, model, "refused token_blocks")
    # "auto" blocks what it can (the MLPs) and says why the head was left alone
    portable_kbit.prepare(
        model, target_modules=TARGETS, token_blocks="auto", gradient_checkpointing_kwargs=CHECKPOINTING
    )
    done = portable_kbit.report(model)
    assert done.blocked_head is None and "lm_head" in done.not_blocked
    assert len(done.blocked_mlps) == 2


def test_a_model_without_mlp_modules_is_reported():
    model = transformers.AutoModelForCausalLM.from_config(tiny.config_for("opt"), dtype=torch.float32)
    portable_kbit.prepare(model, target_modules=tiny.LORA_TARGETS["opt"], token_blocks=BLOCK)
    done = portable_kbit.report(model)
    assert done.blocked_head == "lm_head" and done.blocked_mlps == []
    assert "MLPs" in done.not_blocked


@pytest.mark.parametrize("value", [0, -1, -1024, 1.5, True, False, "AUTO", "", "none", [8]])
def test_bad_token_blocks_refused_before_any_change(value):
    model = build("llama")
    before = model_state.take(model)
    with pytest.raises(ValueError, match=r"token_blocks=.* is not valid: use 'auto'"):
        portable_kbit.prepare(model, token_blocks=value)
    model_state.assert_unchanged(before, model, f"token_blocks={value!r}")
    assert portable_kbit.report(model) is None


# ---- undo, repeat -------------------------------------------------------------------------------------------------


def installed(model) -> dict:
    base = model
    return {
        "loss_function": "_loss_function" in base.__dict__,
        "mlp forwards": sum("forward" in m.__dict__ for n, m in base.named_modules() if n.endswith(".mlp")),
        "hooks": model_state.hook_count(base),
    }


def test_token_blocks_none_undoes_and_a_repeat_does_not_stack():
    model = build("llama")
    prepare = functools.partial(
        portable_kbit.prepare, target_modules=TARGETS, gradient_checkpointing_kwargs=CHECKPOINTING
    )
    prepare(model, token_blocks=None)
    without = installed(model)
    assert without == {"loss_function": False, "mlp forwards": 0, "hooks": without["hooks"]}
    prepare(model, token_blocks=BLOCK)
    once = installed(model)
    assert once["loss_function"] and once["mlp forwards"] == 2 and once["hooks"] == without["hooks"] + 2
    prepare(model, token_blocks=BLOCK)
    assert installed(model) == once
    mlp = model.model.layers[0].mlp
    assert mlp.__dict__["forward"].patch.previous is None  # wraps the class forward, not the previous blocked one
    loss = model.__dict__["_loss_function"]
    assert loss.blocked_loss_of is transformers.loss.loss_utils.ForCausalLMLoss
    prepare(model, token_blocks=None)
    assert installed(model) == without
    model.train()
    assert model(**batch()).logits is not None


# ---- memory: what blocks save at 4096 tokens (torch's MemTracker, CPU) ----------------------------------------------

MiB = 1 << 20


class _NoHandle:
    def remove(self) -> None:
        pass


def peak_bytes(model, inputs) -> int:
    """Peak bytes of tensors alive during one forward and backward, as torch's MemTracker counts them."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    # MemTracker puts a gradient hook on every parameter, which torch refuses for frozen ones: mark those as done
    for param in model.parameters():
        if not param.requires_grad:
            tracker._param_to_grad_hook_handles[param] = (_NoHandle(), _NoHandle())
    tracker.track_external(model)
    with tracker:
        model(**inputs).loss.backward()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize(
    "what,overrides,full_bytes",
    [
        # fp32 logits of a 32k vocabulary at 4096 tokens: 500 MiB for each full-length copy
        ("head and loss", {"vocab_size": 32000, "intermediate_size": 128}, 4096 * 32000 * 4),
        # one [4096, 8192] fp32 MLP intermediate: 128 MiB; a SwiGLU MLP keeps several in backward
        ("MLP", {"vocab_size": 256, "intermediate_size": 8192}, 4096 * 8192 * 4),
    ],
)
def test_memory_saved_at_4096_tokens(what, overrides, full_bytes):
    model = build("llama", num_hidden_layers=1, **overrides)
    inputs = {"input_ids": torch.randint(0, overrides["vocab_size"], (1, 4096)), "labels": None}
    inputs["labels"] = inputs["input_ids"]
    peaks = {}
    for token_blocks in (None, 1024):
        prepared = copy.deepcopy(model)
        portable_kbit.prepare(
            prepared, target_modules=TARGETS, token_blocks=token_blocks, gradient_checkpointing_kwargs=CHECKPOINTING
        )
        prepared = get_peft_model(prepared, LoraConfig(r=4, target_modules=TARGETS))
        prepared.train()
        peaks[token_blocks] = peak_bytes(prepared, inputs)
        if token_blocks is not None:
            assert_blocking_ran(prepared, mlp_calls=1)
    saved = peaks[None] - peaks[1024]
    message = f"{what}: peak {peaks[None] / MiB:.0f} MiB plain, {peaks[1024] / MiB:.0f} MiB in 1024-token blocks"
    assert saved >= 2 * full_bytes, message  # at least two full-length temporaries never exist
    print(message)


def test_norms_in_blocks_keep_their_fp32_temporaries_to_a_block(monkeypatch):
    """An RMSNorm computes in fp32 whatever its dtype, and its backward makes several full-length fp32 temporaries
    (the peak of a long step, benchmarks/peak_breakdown.py): in blocks they exist for one block at a time."""
    from portable_kbit.patches.token_blocks import plan as blocks_plan

    torch.manual_seed(0)  # bf16 hidden states (native): the norms' fp32 temporaries are the peak's largest part
    model = transformers.AutoModelForCausalLM.from_config(
        config("llama", num_hidden_layers=2, hidden_size=512, intermediate_size=64, vocab_size=256),
        dtype=torch.bfloat16,
    )
    inputs = {"input_ids": torch.randint(0, 256, (1, 4096))}
    inputs["labels"] = inputs["input_ids"]
    peaks, losses = {}, {}
    for blocked_norms in (False, True):
        prepared = copy.deepcopy(model)
        with pytest.MonkeyPatch.context() as patch:
            if not blocked_norms:
                patch.setattr(blocks_plan, "_plain_norm", lambda module, hidden: False)
            portable_kbit.prepare(
                prepared,
                target_modules=TARGETS,
                activations="native",
                token_blocks=1024,
                gradient_checkpointing_kwargs=CHECKPOINTING,
            )
        assert bool(portable_kbit.report(prepared).blocked_norms) == blocked_norms
        prepared = get_peft_model(prepared, LoraConfig(r=4, target_modules=TARGETS))
        prepared.train()
        peaks[blocked_norms] = peak_bytes(prepared, inputs)
        losses[blocked_norms] = prepared(**inputs).loss.item()
    full = 4096 * 512 * 4  # one full-length fp32 [tokens, hidden] tensor
    assert peaks[False] - peaks[True] >= 2 * full, (peaks[False] / MiB, peaks[True] / MiB)
    assert losses[True] == losses[False]  # the same forward, block by block


def test_backend_block_size():
    backend = Backend()
    assert backend.token_block_size(4 * 32768, None, unified=False) == 1024  # Mistral's vocabulary
    assert backend.token_block_size(4 * 128256, None, unified=False) == 512  # Llama 3's
    assert backend.token_block_size(4 * 262144, None, unified=False) == 256  # Gemma 3's
    assert backend.token_block_size(4 * 32768, 64 * MiB, unified=False) == 128  # memory pressure: the floor
    assert backend.token_block_size(4 * 32768, None, unified=True) == 1024
    # the MLPs (Llama-3.1-8B's: hidden 4096, intermediate 14336): 1024 by default (its head's: 512); about the
    # hidden width under the "hidden" rule, within the byte cap and shrunk under pressure as the head's are
    assert backend.token_block_size(4 * 14336, None, unified=False, hidden=4096) == 1024
    backend.mlp_block_rule = "hidden"
    assert backend.token_block_size(4 * 14336, None, unified=False, hidden=4096) == 4096
    assert backend.token_block_size(4 * 14336, None, unified=True, hidden=4096) == 2304  # 128 MiB / 56 KiB
    assert backend.token_block_size(4 * 14336, 64 * MiB, unified=False, hidden=4096) == 256
    assert backend.token_block_size(4 * 14336, None, unified=False, hidden=512) == 1024  # never shorter
    # MLP calls up to the hidden width run whole on CUDA's discrete memory only (measured there, not on ROCm)
    from portable_kbit.backends.cuda import CudaBackend
    from portable_kbit.backends.rocm import RocmBackend

    assert Backend().mlp_whole_up_to(4096, unified=False) == 0
    assert CudaBackend().mlp_whole_up_to(4096, unified=False) == 4096
    assert CudaBackend().mlp_whole_up_to(4096, unified=True) == 0  # Jetson
    assert RocmBackend().mlp_whole_up_to(4096, unified=False) == 0
    assert blocks.AUTO == "auto"


def test_mlp_blocks_of_their_own_size(monkeypatch):
    """Under the "hidden" rule the MLPs get blocks of the hidden width (64 here, the head's 16), reported; the step is
    the one without blocks."""
    model = build("llama")
    inputs = batch()  # 80 rows: MLP blocks of 64 and 16 tokens
    plain = train_step(model, None, inputs)
    for name, value in {"default_block_tokens": 16, "min_block_tokens": 8, "block_token_multiple": 8}.items():
        monkeypatch.setattr(Backend, name, value)
    for rule, mlp_tokens in (("head", 16), ("hidden", 64)):
        monkeypatch.setattr(Backend, "mlp_block_rule", rule)
        blocked = train_step(model, "auto", inputs)
        done = portable_kbit.report(blocked[2].get_base_model())
        assert (done.token_blocks, done.mlp_token_blocks) == (16, mlp_tokens)
        assert (f"MLPs in blocks of {mlp_tokens} tokens" in done.summary()) == (rule == "hidden")
        assert_blocking_ran(blocked[2])
        assert_same_step(plain, blocked)


def test_mlp_calls_up_to_the_hidden_width_run_whole_where_the_backend_says(monkeypatch):
    """A backend with mlp_whole_up_to_hidden (CUDA on discrete memory) runs MLP calls of up to the hidden width
    (64 here) whole and longer ones in blocks; reported, counted with the reason, the same step as without blocks."""
    for name, value in {"default_block_tokens": 16, "min_block_tokens": 8, "block_token_multiple": 8}.items():
        monkeypatch.setattr(Backend, name, value)
    monkeypatch.setattr(Backend, "mlp_whole_up_to", lambda self, hidden, unified: hidden)
    model = build("llama")
    short, long = batch(rows=1), batch()  # 40 tokens (more than a block, less than 64), 80
    for inputs, blocked_calls in ((short, 0), (long, 4)):  # 2 layers, each MLP call once more in the recompute
        plain = train_step(model, None, inputs)
        blocked = train_step(model, "auto", inputs)
        assert_same_step(plain, blocked)
        done = portable_kbit.report(blocked[2].get_base_model())
        assert (done.token_blocks, done.mlp_token_blocks, done.mlp_whole_up_to) == (16, 16, 64)
        assert "(calls of up to 64 tokens whole)" in done.summary()
        mlps = calls(blocked[2])["MLPs"]
        assert mlps["blocked"] == blocked_calls, mlps
        if not blocked_calls:
            assert list(mlps["whole"]) == [
                "no more tokens than the hidden width (the backend runs those whole: faster)"
            ]


def test_mlp_whole_rule_does_not_depend_on_the_heads_block(monkeypatch):
    """A big vocabulary shrinks the head's blocks (8 tokens here) below the MLPs' (16); MLP calls up to the hidden
    width still run whole where the backend says so (Llama 3's 128256 vocabulary on CUDA)."""
    sizes = {"default_block_tokens": 16, "min_block_tokens": 8, "block_token_multiple": 8, "max_block_bytes": 12288}
    for name, value in sizes.items():  # 12288 bytes: 12 tokens of fp32 logits (vocabulary 256), 24 of the MLP's
        monkeypatch.setattr(Backend, name, value)
    monkeypatch.setattr(Backend, "is_unified", lambda self, device: False)
    monkeypatch.setattr(Backend, "mlp_whole_up_to_hidden", True)
    model = build("llama")
    portable_kbit.prepare(
        model, target_modules=TARGETS, token_blocks="auto", gradient_checkpointing_kwargs=CHECKPOINTING
    )
    done = portable_kbit.report(model)
    assert (done.token_blocks, done.mlp_token_blocks, done.mlp_whole_up_to) == (8, 16, 64)


def test_failed_repeat_keeps_the_blocks_of_the_call_before(monkeypatch):
    import importlib

    prepare_module = importlib.import_module("portable_kbit.pipeline.prepare")
    model = build("llama")
    portable_kbit.prepare(
        model, target_modules=TARGETS, token_blocks=BLOCK, gradient_checkpointing_kwargs=CHECKPOINTING
    )
    before = model_state.take(model)

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure in the report")

    monkeypatch.setattr(prepare_module, "build_report", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        portable_kbit.prepare(
            model, target_modules=TARGETS, token_blocks=BLOCK * 2, gradient_checkpointing_kwargs=CHECKPOINTING
        )
    model_state.assert_unchanged(before, model, "failed repeat")
    model.train()
    assert model(**batch()).logits is None  # the first call's blocks still work
