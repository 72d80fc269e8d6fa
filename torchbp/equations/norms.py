r"""The normalizations' equations: LayerNorm and RMSNorm, the error carried back through their Jacobian.

A norm maps each sample's normalized dims (the last ``len(normalized_shape)`` ones, n elements) to
:math:`y = γ ⊙ \hat x + β`, with :math:`\hat x = (x − μ)/σ` (LayerNorm, :math:`σ = \sqrt{\mathrm{var}(x) + ε}`) or
:math:`\hat x = x/\mathrm{rms}(x)` (RMSNorm, :math:`\mathrm{rms}(x) = \sqrt{\mathrm{mean}(x^2) + ε}`). With δ the
error at the norm's output and :math:`g = γ ⊙ δ`, the error carried back (BP2's counterpart, the norm's Jacobian
applied to g; the Jacobian is symmetric, so the same product is the forward-mode derivative) is

- LayerNorm: :math:`δ_x = \frac{1}{σ}(g − \mathrm{mean}(g) − \hat x\,\mathrm{mean}(g ⊙ \hat x))`,
- RMSNorm: :math:`δ_x = \frac{1}{\mathrm{rms}(x)}(g − \hat x\,\mathrm{mean}(g ⊙ \hat x))`,

the means over the normalized dims; the parameters' gradients (BP4's and BP3's counterparts) are
:math:`∂C/∂γ = Σ δ ⊙ \hat x` and :math:`∂C/∂β = Σ δ`, summed over the batch dims.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sum_over(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t`` summed over the batch ``dims``; ``t`` itself for none (``Tensor.sum(())`` would sum every dim)."""
    return t.sum(dims) if dims else t


def layer_norm_statistics(input: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor]:
    r"""μ and 1/σ of each sample over ``dims`` (kept), :math:`σ = \sqrt{\mathrm{var}(x) + ε}` (the biased variance)."""
    mean = input.mean(dims, keepdim=True)
    rstd = torch.rsqrt((input - mean).pow(2).mean(dims, keepdim=True) + eps)
    return mean, rstd


def rms_norm_statistics(input: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    r""":math:`1/\mathrm{rms}(x)` of each sample over ``dims`` (kept), :math:`\mathrm{rms}(x) = \sqrt{\mathrm{mean}(x^2) + ε}`."""
    return torch.rsqrt(input.pow(2).mean(dims, keepdim=True) + eps)


def layer_norm_backward(
    delta: Tensor,
    input: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    n_normalized: int,
    need_input: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    r"""The gradients of LayerNorm :math:`y = γ ⊙ \hat x + β` from δ = ∂C/∂y: ``(δ_x, ∂C/∂γ, ∂C/∂β)``.

    ``mean`` and ``rstd`` are μ and 1/σ of each sample (kept dims); the last ``n_normalized`` dims are normalized.
    Each result is ``None`` unless asked for.
    """
    dims = tuple(range(-n_normalized, 0))
    batch = tuple(range(input.dim() - n_normalized))
    x_hat = (input - mean) * rstd  # x̂ = (x − μ)/σ
    grad_input = grad_weight = grad_bias = None
    if need_input:
        g = delta if weight is None else delta * weight  # g = γ ⊙ δ
        gx = (g * x_hat).mean(dims, keepdim=True)
        grad_input = rstd * (g - g.mean(dims, keepdim=True) - x_hat * gx)  # BP2: δ_x = (1/σ)(g − mean(g) − x̂·mean(g·x̂))
    if need_weight:
        grad_weight = _sum_over(delta * x_hat, batch)  # BP4: ∂C/∂γ = Σ δ ⊙ x̂
    if need_bias:
        grad_bias = _sum_over(delta, batch)  # BP3: ∂C/∂β = Σ δ
    return grad_input, grad_weight, grad_bias


def rms_norm_backward(
    delta: Tensor,
    input: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    n_normalized: int,
    need_input: bool = True,
    need_weight: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    r"""The gradients of RMSNorm :math:`y = γ ⊙ x/\mathrm{rms}(x)` from δ = ∂C/∂y: ``(δ_x, ∂C/∂γ)``.

    ``rstd`` is :math:`1/\mathrm{rms}(x)` of each sample (kept dims); the last ``n_normalized`` dims are normalized.
    """
    dims = tuple(range(-n_normalized, 0))
    batch = tuple(range(input.dim() - n_normalized))
    x_hat = input * rstd  # x̂ = x/rms(x)
    grad_input = grad_weight = None
    if need_input:
        g = delta if weight is None else delta * weight  # g = γ ⊙ δ
        grad_input = rstd * (g - x_hat * (g * x_hat).mean(dims, keepdim=True))  # BP2: δ_x = (g − x̂·mean(g·x̂))/rms
    if need_weight:
        grad_weight = _sum_over(delta * x_hat, batch)  # BP4: ∂C/∂γ = Σ δ ⊙ x̂
    return grad_input, grad_weight


def layer_norm_jvp(
    input: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    n_normalized: int,
    d_input: Tensor | None,
    d_weight: Tensor | None,
    d_bias: Tensor | None,
) -> Tensor | None:
    r"""The forward-mode derivative of LayerNorm: :math:`dy = γ ⊙ d\hat x + dγ ⊙ \hat x + dβ`, with
    :math:`d\hat x = \frac{1}{σ}(dx − \mathrm{mean}(dx) − \hat x\,\mathrm{mean}(dx ⊙ \hat x))` (the Jacobian is
    symmetric: BP2's product with dx in place of g)."""
    dims = tuple(range(-n_normalized, 0))
    x_hat = (input - mean) * rstd
    dy = None
    if d_input is not None:
        d_x_hat = rstd * (
            d_input - d_input.mean(dims, keepdim=True) - x_hat * (d_input * x_hat).mean(dims, keepdim=True)
        )
        dy = d_x_hat if weight is None else d_x_hat * weight
    if d_weight is not None:
        dy = x_hat * d_weight if dy is None else dy + x_hat * d_weight
    if d_bias is not None:
        dy = d_bias.expand(input.shape) if dy is None else dy + d_bias
    return dy  # dy = γ dx̂ + dγ x̂ + dβ


def rms_norm_jvp(
    input: Tensor,
    rstd: Tensor,
    weight: Tensor | None,
    n_normalized: int,
    d_input: Tensor | None,
    d_weight: Tensor | None,
) -> Tensor | None:
    r"""The forward-mode derivative of RMSNorm: :math:`dy = γ ⊙ d\hat x + dγ ⊙ \hat x`, with
    :math:`d\hat x = \frac{1}{\mathrm{rms}(x)}(dx − \hat x\,\mathrm{mean}(dx ⊙ \hat x))`."""
    dims = tuple(range(-n_normalized, 0))
    x_hat = input * rstd
    dy = None
    if d_input is not None:
        d_x_hat = rstd * (d_input - x_hat * (d_input * x_hat).mean(dims, keepdim=True))
        dy = d_x_hat if weight is None else d_x_hat * weight
    if d_weight is not None:
        dy = x_hat * d_weight if dy is None else dy + x_hat * d_weight
    return dy  # dy = γ dx̂ + dγ x̂
