"""The preference objectives as pure functions of per-sample denoising errors.

Each takes errors err = mean_{H,W,C} (eps_pred - target)^2, one number per image (``denoising_error``),
from the policy and (except MaPO) the frozen reference, and returns (loss, metrics). docs/methods.md §1-3,
§7 (Diffusion-KTO), §8 (MaPO).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# PickScore's range over Pick-a-Pic v2 (cosine, no x100): SmPO's normalisation constants (docs/methods.md §3).
PICKSCORE_MIN = 0.11543526500463486
PICKSCORE_MAX = 0.28201571106910706


def denoising_error(pred, target):
    """Per-sample mean squared error in fp32. pred, target: [B, H, W, C] -> [B]."""
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def _preference_logits(err_w, err_l, ref_err_w, ref_err_l, scale):
    """inside = -0.5 * scale * (Δθ - Δref), Δ = err_w - err_l (docs/methods.md §1)."""
    model_gap = err_w - err_l
    ref_gap = ref_err_w - ref_err_l
    return -0.5 * scale * (model_gap - ref_gap), model_gap, ref_gap


def _pair_metrics(inside, model_gap, ref_gap):
    return {
        "implicit_acc": jnp.mean((inside > 0).astype(jnp.float32)),
        "model_gap": jnp.mean(model_gap),
        "ref_gap": jnp.mean(ref_gap),
        # The implicit reward margin r(x_w) - r(x_l) of the DPO derivation equals ``inside``.
        "reward_margin": jnp.mean(inside),
    }


def dpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta):
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14 as in the released code): -log σ(-β/2 (Δθ - Δref)).

    All errors: [B]. At init (policy = reference) the loss is exactly log 2.
    """
    inside, model_gap, ref_gap = _preference_logits(err_w, err_l, ref_err_w, ref_err_l, beta)
    loss = -jnp.mean(jax.nn.log_sigmoid(inside))
    return loss, _pair_metrics(inside, model_gap, ref_gap)


def smpo_preference(reward_w, reward_l, r_min=PICKSCORE_MIN, r_max=PICKSCORE_MAX):
    """SmPO's smoothed preference p = e^{r'_w} / (e^{r'_w} + e^{r'_l}), r' = (r - r_min) / (r_max - r_min)."""
    scale = 1.0 / (r_max - r_min)
    rw = (reward_w - r_min) * scale
    rl = (reward_l - r_min) * scale
    return jax.nn.sigmoid(rw - rl)


def smpo_loss(err_w, err_l, ref_err_w, ref_err_l, beta, prob_w, gamma=10.0):
    """SmPO-Diffusion (Lu et al. 2025): DPO with the margin scaled by γ(2p - 1) per pair.

    prob_w: [B] smoothed preference of the winner (``smpo_preference``). γ(2p−1) = 1 is DPO; p = 0.5
    (equal rewards) gives log 2 and zero gradient.
    """
    smoothing = gamma * (2.0 * prob_w - 1.0)
    inside, model_gap, ref_gap = _preference_logits(err_w, err_l, ref_err_w, ref_err_l, beta * smoothing)
    loss = -jnp.mean(jax.nn.log_sigmoid(inside))
    metrics = _pair_metrics(inside, model_gap, ref_gap)
    metrics["smoothing"] = jnp.mean(smoothing)
    return loss, metrics


def dro_loss(expert_err, expert_ref_err, negative_err, negative_ref_err, margin=0.001):
    """Diffusion-DRO (Wu et al. 2025): hinge mean(max(0, Le - Lp + m)).

    Le = err(φ) - err(ref) on the expert's forward-noised latent, Lp likewise on the policy's own
    online negative. No β, no sigmoid, no timestep weight (docs/methods.md §2).
    """
    expert_gap = expert_err - expert_ref_err
    negative_gap = negative_err - negative_ref_err
    hinge = expert_gap - negative_gap + margin
    loss = jnp.mean(jnp.maximum(hinge, 0.0))
    metrics = {
        "implicit_acc": jnp.mean((expert_gap < negative_gap).astype(jnp.float32)),
        "expert_gap": jnp.mean(expert_gap),
        "negative_gap": jnp.mean(negative_gap),
        "reward_margin": jnp.mean(negative_gap - expert_gap),
        "active_hinge": jnp.mean((hinge > 0).astype(jnp.float32)),
        "expert_err": jnp.mean(expert_err),
        "negative_err": jnp.mean(negative_err),
    }
    return loss, metrics


def kto_loss(err, ref_err, desirable, beta, lambda_desirable=1.0, lambda_undesirable=1.0):
    """Diffusion-KTO (Li et al. 2024) with the Kahneman-Tversky sigmoid value, as the released code trains it.

    err, ref_err: [N] per-image errors; desirable: [N] bool, the image's binary label. Per image the implicit
    log-likelihood ratio g = err_ref - err; the reference point z = max(0, mean g) is one number over all N
    images of the micro-batch (every device's), clipped at 0 and held constant (no gradient):
      loss = mean λ_y (1 - σ(y β (g - z))),  y = +1 desirable, -1 undesirable.
    At policy = reference: loss = mean λ_y / 2, and the gradient lowers desirable errors and raises undesirable ones.
    """
    gap = ref_err - err
    ref_point = jax.lax.stop_gradient(jnp.maximum(jnp.mean(gap), 0.0))
    sign = jnp.where(desirable, 1.0, -1.0)
    logit = sign * beta * (gap - ref_point)
    weight = jnp.where(desirable, lambda_desirable, lambda_undesirable)
    loss = jnp.mean(weight * (1.0 - jax.nn.sigmoid(logit)))

    def masked_mean(v, mask):  # 0 where the micro-batch holds no image of that label
        return jnp.sum(jnp.where(mask, v, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

    metrics = {
        "implicit_acc": jnp.mean((logit > 0).astype(jnp.float32)),
        "reference_point": ref_point,
        "mean_gap": jnp.mean(gap),                 # the reference point before clipping
        "desirable_gap": masked_mean(gap, desirable),
        "undesirable_gap": masked_mean(gap, ~desirable),
        "err": jnp.mean(err),
    }
    return loss, metrics


def mapo_score(err, snr_value=0.5):
    """MaPO's per-image score of the released code: x / (exp(x) - 1), x = snr_value · err (1 at x = 0); it
    falls as the error grows, so a better-denoised image scores higher."""
    x = snr_value * err
    nonzero = x != 0
    safe = jnp.where(nonzero, x, 1.0)
    return jnp.where(nonzero, safe / jnp.expm1(safe), 1.0)


def mapo_loss(err_w, err_l, beta, snr_value=0.5, num_timesteps=1000):
    """MaPO (Hong et al. 2024), reference-free: the winner's denoising error plus a margin term on the pair.

    err_w, err_l: [B] policy errors of winner and loser (one t and one ε per pair):
      margin = T · (score(err_w) - score(err_l))            (``mapo_score``; T = the schedule's timesteps)
      loss   = mean err_w - β · mean log σ(margin)
    A pair whose winner already scores far above its loser saturates σ and leaves the winner's term alone.
    """
    margin = num_timesteps * (mapo_score(err_w, snr_value) - mapo_score(err_l, snr_value))
    log_odds = jax.nn.log_sigmoid(margin)
    winner_err = jnp.mean(err_w)
    loss = winner_err - beta * jnp.mean(log_odds)
    metrics = {
        "implicit_acc": jnp.mean((margin > 0).astype(jnp.float32)),
        "reward_margin": jnp.mean(margin),
        "margin_loss": -jnp.mean(log_odds),
        "model_gap": jnp.mean(err_w - err_l),
        "err_w": winner_err,
        "err_l": jnp.mean(err_l),
    }
    return loss, metrics
