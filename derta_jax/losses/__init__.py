"""Training objectives, each a pure function of arrays.

  derta       DeRTa's MLE + RTO (the authors' pooled token mean), chunked over the sequence
              so the [B, T, V] logits never exist
  chunked     the chunked output layer, and per-position log-probs from hidden states
  rivals      DPO, Qi et al.'s token-wise constrained objective, NPO / DOOR (W-DOOR's token
              weights), circuit breakers' representation rerouting: functions of
              per-position log-probs or hidden states and masks, so packing and padding are
              one code path
  objectives  which objective a run trains, and each rival as one function of the batch
"""

from derta_jax.losses.chunked import token_logprobs_from_hidden
from derta_jax.losses.derta import (
    BATCH_KEYS,
    NORMALIZE,
    LossConfig,
    check_batch,
    derta_loss,
    derta_loss_from_hidden,
    loss_weights,
    mle_loss,
    refusal_logprobs,
    refusal_tuple,
    rto_keep_mask,
    rto_loss,
    token_logprobs,
)
from derta_jax.losses.rivals import wdoor_weights

__all__ = ["BATCH_KEYS", "NORMALIZE", "LossConfig", "check_batch", "derta_loss",
           "derta_loss_from_hidden", "loss_weights", "mle_loss", "refusal_logprobs",
           "refusal_tuple", "rto_keep_mask", "rto_loss", "token_logprobs",
           "token_logprobs_from_hidden", "wdoor_weights"]
