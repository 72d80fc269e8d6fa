r"""The embedding's equations: a lookup :math:`y_n = E_{i_n}`, so the error δ_n at position n reaches row i_n only.

BP4's counterpart is a scatter-add, :math:`∂C/∂E_i = Σ_{n: i_n = i} δ_n`: the sum of δ over the positions whose
index is i (none for the padding row). The indices are integers: no error is carried back past the embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def embedding_backward(
    delta: Tensor, indices: Tensor, num_embeddings: int, padding_idx: int | None, scale_grad_by_freq: bool
) -> Tensor:
    r""":math:`∂C/∂E`, shape ``(num_embeddings, embedding_dim)``, from δ = ∂C/∂y (shape ``indices.shape + (dim,)``).

    ``padding_idx``: that row gets no gradient. ``scale_grad_by_freq``: each position's δ is divided by the number of
    positions in the batch with the same index, as torch's.
    """
    flat = indices.reshape(-1)
    rows = delta.reshape(-1, delta.shape[-1])
    if scale_grad_by_freq:
        counts = torch.zeros(num_embeddings, dtype=delta.dtype, device=delta.device)
        counts = counts.index_add(0, flat, torch.ones_like(flat, dtype=delta.dtype))  # the positions of each index
        rows = rows / counts[flat].unsqueeze(1)
    if padding_idx is not None:
        rows = rows.masked_fill((flat == padding_idx).unsqueeze(1), 0)  # the padding row learns nothing
    grad_weight = delta.new_zeros(num_embeddings, delta.shape[-1])
    return grad_weight.index_add(0, flat, rows)  # BP4: ∂C/∂E_i = Σ_{n: i_n = i} δ_n, a scatter-add


def embedding_jvp(indices: Tensor, d_weight: Tensor) -> Tensor:
    r"""The forward-mode derivative of the lookup: :math:`dy_n = dE_{i_n}` (linear in E), as torch's."""
    return F.embedding(indices, d_weight)  # dy = dE[i]
