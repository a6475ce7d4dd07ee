"""Stage-1 math: project a task vector onto the null space of the thinking-token features.

Pure functions on tensors. Notation: ``H`` is the feature matrix [m, d] (one row per thinking position), its thin
SVD is H = U·diag(s)·Vᵀ with V [d, k] and s [k] (k = min(m, d)); ``delta`` is a module's ΔW [out, d].
"""

from __future__ import annotations

import torch


def feature_svd(features: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors and singular values of a feature matrix.

    Args:
        features: H [m, d].
        dtype: arithmetic precision (float32 or float64).

    Returns:
        V [d, k] and s [k] (descending), k = min(m, d). Only V and s are kept: they determine both the exact and
        the ridge projection, and ‖X Hᵀ‖ = ‖X V diag(s)‖ for any X.
    """
    h = features.to(dtype)
    _, s, vh = torch.linalg.svd(h, full_matrices=False)
    return vh.transpose(0, 1).contiguous(), s


def protected_basis(v: torch.Tensor, s: torch.Tensor, rcond: float) -> torch.Tensor:
    """Orthonormal basis [d, r] of the row space of H: singular directions with s > rcond·s_max."""
    _check_finite(s)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return v[:, :0]
    keep = s > rcond * s[0]
    return v[:, keep]


def _check_finite(s: torch.Tensor) -> None:
    # NaN singular values compare False with the cut-off: the basis would come out empty and the task vector
    # would be merged unprojected, with nothing said.
    if not bool(torch.isfinite(s).all()):
        raise ValueError("The feature matrix has non-finite singular values (its features hold inf or NaN): "
                         "recompute them with the reasoning model loaded in float32, or check its weights.")


def project_svd(delta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """ΔW⊥ = ΔW − (ΔW B) Bᵀ: ΔW with the protected directions removed (paper Eq. 4–5).

    Args:
        delta: ΔW [out, d].
        basis: B [d, r] with orthonormal columns.

    Returns:
        ΔW⊥ [out, d], in the dtype of ``delta``.

    Example:
        >>> h = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # features span e1 and e2
        >>> v, s = feature_svd(h)
        >>> project_svd(torch.ones(2, 3), protected_basis(v, s, rcond=0.1)).abs()
        tensor([[0., 0., 1.],
                [0., 0., 1.]])
        >>> project_svd(torch.ones(2, 3), protected_basis(v, s, rcond=0.6)).abs()  # 1 < 0.6·2: e2 is not kept
        tensor([[0., 1., 1.],
                [0., 1., 1.]])
    """
    b = basis.to(delta.dtype)
    return delta - (delta @ b) @ b.transpose(0, 1)


def project_ridge(delta: torch.Tensor, v: torch.Tensor, s: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge form ΔW − ΔW Hᵀ(HHᵀ + εI)⁻¹H with ε = ridge·s_max², computed as ΔW − ΔW V diag(s²/(s²+ε)) Vᵀ.

    Args:
        delta: ΔW [out, d]; v: V [d, k]; s: [k]; ridge: relative ε.
    """
    _check_finite(s)
    if s.numel() == 0 or float(s[0]) == 0.0:  # H = 0 constrains nothing (and ε = 0 would give 0/0)
        return delta.clone()
    # the shrink weights in s's precision: s² overflows (or underflows) in float16 when s_max > 256
    s2 = s.double() ** 2
    weights = (s2 / (s2 + ridge * s2[0])).to(delta.dtype)
    vv = v.to(delta.dtype)
    return delta - ((delta @ vv) * weights) @ vv.transpose(0, 1)


def removed_fraction(delta: torch.Tensor, projected: torch.Tensor) -> float:
    """1 − ‖ΔW⊥‖_F / ‖ΔW‖_F: the share of the task vector's norm the projection took away (0 for ΔW = 0)."""
    norm = float(torch.linalg.vector_norm(delta))
    if norm == 0.0:
        return 0.0
    return 1.0 - float(torch.linalg.vector_norm(projected)) / norm


def feature_residual(delta: torch.Tensor, projected: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> float:
    """‖ΔW⊥ Hᵀ‖_F / ‖ΔW Hᵀ‖_F from the SVD of H (0 when ΔW Hᵀ = 0)."""
    vs = v.to(delta.dtype) * s.to(delta.dtype)
    before = float(torch.linalg.vector_norm(delta @ vs))
    if before == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(projected @ vs)) / before


def with_bias_column(features: torch.Tensor) -> torch.Tensor:
    """[H | 1]: features of a module whose bias is treated as the weight of a constant input 1."""
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


def without_bias_column(v: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD of H from the SVD of [H | 1]: for a module without a bias in a group whose features carry the column.

    Such a module must satisfy ΔW h = 0 on the rows of H itself; projecting [ΔW | 0] against [H | 1] and dropping
    the last column would leave ΔW h = −(the dropped column's value). Since H = U·diag(s)·V[:d]ᵀ, the SVD of
    V[:d]·diag(s) gives H's right singular vectors and singular values exactly (the full thin SVD is kept).

    Args:
        v: V [d + 1, k] and s [k] of [H | 1].

    Returns:
        V [d, min(d, k)] and s [min(d, k)] (descending) of H; directions beyond H's rank have s = 0.
    """
    left, sigma, _ = torch.linalg.svd(v[:-1] * s, full_matrices=False)
    return left.contiguous(), sigma
