"""Which objective a run trains, and each rival objective as one function of the batch.

The train step computes what an objective needs from the model (per-position log-probs of
the policy, of the reference model, per-layer hidden states) and calls `rival_loss`; DeRTa
itself keeps its fused chunked loss (`derta_loss_from_hidden`).

Batch arrays (derta_jax.data.packing.ARRAYS) and what each objective trains on them:
  mle_mask      helpful and safety responses (MLE)         derta, dpo (SFT), qi (constrained)
  safety_mask   the safety part of mle_mask                door: refusal term vs utility term
  rto_mask      RTO positions                              derta
  harm_mask     harmful responses' own tokens              dpo rejected, door NPO, cb reroute
  chosen_mask   the chosen half of a preference pair       dpo chosen
  pair_ids      which chosen and rejected halves pair up   dpo
  response_index  a target's index in its response          qi's beta schedule
Circuit breakers retain the hidden states on mle_mask and reroute them on harm_mask.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp

from derta_jax.losses import rivals

OBJECTIVES = ("derta", "dpo", "qi", "door", "circuit_breaker")
# Objectives that read a frozen reference model (the weights at the start of fine-tuning,
# or with LoRA the base with its adapters off).
NEEDS_REFERENCE = ("dpo", "qi", "door", "circuit_breaker")
# ... and what each needs of it: per-position log-probs or per-layer hidden states.
NEEDS_HIDDEN_LAYERS = ("circuit_breaker",)
MASKS = ("mle_mask", "safety_mask", "harm_mask", "chosen_mask")


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _utility(batch):
  return _f32(batch["mle_mask"]) * (1.0 - _f32(batch["safety_mask"]))


def global_counts(objective: str, batch: Mapping) -> dict:
  """The normalisers of `objective` over the whole global batch, so that micro-batch losses
  (gradient accumulation) add up to the global batch's loss."""
  seg = batch["segment_ids"]
  n = lambda m: jnp.sum(_f32(m))  # noqa: E731
  seqs = lambda m: rivals.sequence_count(mask_BxT=m, ids_BxT=seg)  # noqa: E731
  if objective == "dpo":
    either = jnp.maximum(_f32(batch["chosen_mask"]), _f32(batch["harm_mask"]))
    return dict(mle_tokens=n(batch["mle_mask"]), chosen_tokens=n(batch["chosen_mask"]),
                pairs=rivals.sequence_count(mask_BxT=either, ids_BxT=batch["pair_ids"]))
  if objective == "qi":
    return dict(mle_tokens=n(batch["mle_mask"]))
  if objective == "door":
    return dict(utility_sequences=seqs(_utility(batch)),
                safety_sequences=seqs(batch["safety_mask"]),
                harm_sequences=seqs(batch["harm_mask"]))
  if objective == "circuit_breaker":
    return dict(reroute_tokens=n(batch["harm_mask"]), retain_tokens=n(batch["mle_mask"]))
  raise ValueError(f"objective {objective!r} has no rival loss; rivals: {NEEDS_REFERENCE}")


def rival_loss(cfg, *, batch: Mapping, counts: Mapping, logp_BxT=None, ref_logp_BxT=None,
               hidden_LxBxTxD=None, ref_hidden_LxBxTxD=None, token_weights_BxT=None,
               step=None):
  """(loss, metrics) of objective cfg.objective (a `LossConfig`) on one (micro-)batch.

  dpo   mean NLL on mle_mask + loss.dpo_sft_weight * mean NLL on chosen_mask
        + DPO(chosen_mask vs harm_mask, pairs by pair_ids, beta = loss.dpo_beta)
  qi    Qi et al.'s token-wise constrained objective on every mle_mask token, beta_t by
        response_index (loss.qi_betas for the first tokens, loss.qi_beta_rest after)
  door  DOOR: alpha * (sequence NLL of safety_mask [W-DOOR: token-weighted] + NPO of
        harm_mask) + (1 - alpha) * sequence NLL of the rest of mle_mask (utility)
  circuit_breaker  c_rr(step) * ReLU(cos) on harm_mask + c_ret(step) * L2 on mle_mask,
        of the hidden states of loss.cb_*_layers against the reference's
  """
  objective = cfg.objective
  if objective == "dpo":
    mle, mle_metrics = _nll_mean(logp_BxT, batch["mle_mask"], counts["mle_tokens"])
    dpo, metrics = rivals.dpo_loss(
        logp_BxT=logp_BxT, ref_logp_BxT=ref_logp_BxT, chosen_mask_BxT=batch["chosen_mask"],
        rejected_mask_BxT=batch["harm_mask"], pair_ids_BxT=batch["pair_ids"],
        beta=cfg.dpo_beta, n_pairs=counts["pairs"])
    loss = mle + dpo
    if cfg.dpo_sft_weight:
      sft, _ = _nll_mean(logp_BxT, batch["chosen_mask"], counts["chosen_tokens"])
      loss = loss + cfg.dpo_sft_weight * sft
      metrics = dict(metrics, chosen_nll=sft)
    return loss, dict(metrics, **mle_metrics, loss=loss)
  if objective == "qi":
    betas_BxT = rivals.qi_betas(response_index_BxT=batch["response_index"],
                                first=tuple(cfg.qi_betas), rest=cfg.qi_beta_rest)
    loss, metrics = rivals.qi_loss(logp_BxT=logp_BxT, ref_logp_BxT=ref_logp_BxT,
                                   mask_BxT=batch["mle_mask"], beta_BxT=betas_BxT,
                                   n_tokens=counts["mle_tokens"])
    _, mle_metrics = _nll_mean(logp_BxT, batch["mle_mask"], counts["mle_tokens"])
    return loss, dict(metrics, **mle_metrics, loss=loss)
  if objective == "door":
    loss, metrics = rivals.door_loss(
        logp_BxT=logp_BxT, ref_logp_BxT=ref_logp_BxT, utility_mask_BxT=_utility(batch),
        safety_mask_BxT=batch["safety_mask"], harm_mask_BxT=batch["harm_mask"],
        segment_ids_BxT=batch["segment_ids"], beta=cfg.npo_beta, alpha=cfg.door_alpha,
        token_weights_BxT=token_weights_BxT, counts=counts)
    return loss, dict(metrics, loss=loss)
  if objective == "circuit_breaker":
    c_reroute, c_retain = rivals.circuit_breaker_coefficients(
        step=step, total_steps=cfg.total_steps, alpha=cfg.cb_alpha)
    loss, metrics = rivals.circuit_breaker_loss(
        hidden_LxBxTxD=hidden_LxBxTxD, ref_hidden_LxBxTxD=ref_hidden_LxBxTxD,
        reroute_mask_BxT=batch["harm_mask"], retain_mask_BxT=batch["mle_mask"],
        reroute_layers=tuple(cfg.cb_reroute_layers), retain_layers=tuple(cfg.cb_retain_layers),
        c_reroute=c_reroute, c_retain=c_retain, n_reroute=counts["reroute_tokens"],
        n_retain=counts["retain_tokens"])
    return loss, dict(metrics, loss=loss)
  raise ValueError(f"objective {objective!r} has no rival loss; rivals: {NEEDS_REFERENCE}")


def _nll_mean(logp_BxT, mask_BxT, n):
  """(sum of -logp over mask / n, metrics of this micro-batch: mle_loss (its own mean) and
  mle_tokens)."""
  mask_BxT = _f32(mask_BxT)
  total, here = -jnp.sum(logp_BxT * mask_BxT), jnp.sum(mask_BxT)
  return total / jnp.maximum(n, 1.0), dict(mle_loss=total / jnp.maximum(here, 1.0),
                                           mle_tokens=here)
