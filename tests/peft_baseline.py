"""peft's own prepare_model_for_kbit_training, called as the baseline the tests compare with.

peft (0.21.2) calls transformers' ``gradient_checkpointing_enable``, which transformers 5.24 deprecated: that warning
is peft's call, not ours, so it is filtered here and only here (pytest turns deprecations into errors elsewhere).
"""

from __future__ import annotations

import warnings
from typing import Any

import peft

PEFTS_OWN_DEPRECATIONS = r"`gradient_checkpointing_enable` is deprecated"
#: what peft's default call leaves to torch (reentrant checkpointing), said explicitly for the tests that train the
#: baseline: torch warns at every checkpointed call where it is left out. prepare() says it explicitly too.
TORCHS_DEFAULT_CHECKPOINTING = {"use_reentrant": True}


def prepare_with_peft(model: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFTS_OWN_DEPRECATIONS, category=FutureWarning)
        return peft.prepare_model_for_kbit_training(model, *args, **kwargs)
