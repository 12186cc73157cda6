"""Token blocks for long sequences: the output head with the loss, and each decoder layer's position-wise MLP, run
block by block over tokens with recompute in backward, so that the ``[tokens, vocab]`` logits and the
``[tokens, intermediate]`` MLP temporaries never exist at full length.

Everything goes through transformers' extension points, for every architecture alike:

- the head and the loss (``head_loss.py``): a forward pre-hook on the model sees ``labels`` (training mode); a
  one-shot pre-hook on the output head it then finds (``get_output_embeddings()``, looked up on each call, so that a
  peft wrapper added after prepare() is the one hooked) keeps the hidden states and lets the head run on zero tokens;
  the model's settable ``loss_function`` computes transformers' causal-LM loss from the kept hidden states, one
  checkpointed block at a time, through the head module itself (so the head's numerics follow ``activations`` and its
  adapters train); a forward hook then sets ``outputs.logits`` to None, as Liger's ``skip_logits`` does.
- whatever the model does to the logits between the head and the loss (Gemma's soft-capping, Cohere's
  ``logit_scale``, Granite's ``logits_scaling``, any other elementwise op) is recorded once by the trace
  (``model/logit_transform.py``) and replayed on each block. One that is not elementwise cannot be replayed: prepare()
  refuses an explicit block size for such a model, and ``"auto"`` leaves its head alone.
- the MLPs (``mlp.py``): found by behaviour in the same trace (a module that consumes a norm's output, is called with
  that one tensor and nothing else, and returns a tensor of the same shape), then given an instance forward that runs
  it on blocks of tokens, each under non-reentrant checkpointing (nested inside transformers' own layer
  checkpointing). MoE blocks whose router outputs transformers records (for the auxiliary loss) are blocked where the
  recorded entries can be merged back into one per layer (transformers 5's output collector); elsewhere they are left
  alone.

What is blocked is decided from the trace before any change (``plan.py``); what ran, blocked or whole and why, is
counted call by call (``counts.py``) and shown by ``portable_kbit.report(model)``.
"""
