"""Sparse autograd kernels: the SAE step touches only active latents.

Sparse codes travel inside the kernels as a flat COO list sorted by token: ``vals[nnz]`` of latent ``cols[nnz]`` on
token ``rows[nnz]``. Every scatter/gather is an ``embedding_bag`` (a segmented weighted row sum, multithreaded, no
``[nnz, d_in]`` temporary):

* decode          x̂[r]      = Σ_{j: rows_j = r} vals_j · W_dec[cols_j]
* grad W_dec      dW_dec[c] = Σ_{j: cols_j = c} vals_j · dx̂[rows_j]      (same op with roles swapped)
* grad W_enc      dW_enc[c] = Σ_{j: cols_j = c} dvals_j · x[rows_j]

The encoders never produce a gradient for the input ``x`` — activations are data. The input centring by ``b_dec`` is
folded into the bias by the caller, so ``b_dec`` still gets its (cheap, ``[d_sae] @ [d_sae, d_in]``) gradient.
Dense references for every kernel live in the tests.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

_GATHER_CHUNK = 1 << 14  # entries per chunk when forming per-entry dot products (bounded temporaries)


def _segment_sum(table: Tensor, index: Tensor, segments: Tensor, n_segments: int, weights: Tensor) -> Tensor:
    """out[s] = Σ_{j: segments_j = s} weights_j · table[index_j]; ``segments`` must be sorted ascending."""
    counts = torch.bincount(segments, minlength=n_segments)
    offsets = torch.zeros(n_segments, dtype=torch.long, device=table.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


def _row_dots(a: Tensor, rows: Tensor, b: Tensor, cols: Tensor, width: int | None) -> Tensor:
    """d_j = ⟨a[rows_j], b[cols_j]⟩, in chunks (uses a batched matmul when every row has ``width`` entries)."""
    out = torch.empty(rows.numel(), dtype=a.dtype, device=a.device)
    if width is not None and width > 0:
        n_rows = rows.numel() // width
        step = max(1, _GATHER_CHUNK // width)
        for s in range(0, n_rows, step):
            e = min(n_rows, s + step)
            bs = b.index_select(0, cols[s * width : e * width]).view(e - s, width, -1)
            out[s * width : e * width] = torch.bmm(bs, a[s:e].unsqueeze(2)).view(-1)
        return out
    for s in range(0, rows.numel(), _GATHER_CHUNK):
        e = min(rows.numel(), s + _GATHER_CHUNK)
        out[s:e] = (a.index_select(0, rows[s:e]) * b.index_select(0, cols[s:e])).sum(1)
    return out


def _weight_grad(x: Tensor, rows: Tensor, cols: Tensor, g: Tensor, n_latents: int) -> tuple[Tensor, Tensor]:
    """(Σ_j g_j x[rows_j] per latent, Σ_j g_j per latent): encoder weight and bias gradients, active latents only."""
    sorted_cols, order = torch.sort(cols)
    gw = _segment_sum(x, rows[order], sorted_cols, n_latents, g[order])
    gb = torch.zeros(n_latents, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
    return gw, gb


class SparseDecode(torch.autograd.Function):
    """x̂ = Σ vals·W_dec[cols] per row. Backward: grads for ``vals`` and the active decoder rows only."""

    @staticmethod
    def forward(ctx, vals: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, n_rows: int, width: int | None = None):
        ctx.save_for_backward(vals, rows, cols, W_dec)
        ctx.n_rows, ctx.width = n_rows, width
        return _segment_sum(W_dec, cols, rows, n_rows, vals)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        vals, rows, cols, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        g_vals = g_w = None
        if ctx.needs_input_grad[0]:
            g_vals = _row_dots(grad_out, rows, W_dec, cols, ctx.width).to(vals.dtype)
        if ctx.needs_input_grad[3]:
            sorted_cols, order = torch.sort(cols)
            g_w = _segment_sum(grad_out, rows[order], sorted_cols, W_dec.shape[0], vals[order])
        return g_vals, None, None, g_w, None, None


def sparse_decode(vals: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, n_rows: int, width: int | None = None):
    """Decoder product without the bias; ``rows`` sorted ascending. ``width``: entries per row if all rows equal."""
    return SparseDecode.apply(vals, rows, cols, W_dec, n_rows, width)


class SparseEncode(torch.autograd.Function):
    """Fused encoder + selection: ``pre = x Wᵀ + bias`` then keep either the top-k per row (``batch=False``) or the top
    ``k·N`` of the whole batch (BatchTopK), ReLU'd, plus optionally the AuxK top-``aux_k`` among ``dead`` latents.

    Returns flat COO ``(vals, rows, cols, aux_vals, aux_rows, aux_cols)`` sorted by row. The dense ``pre`` matrix is
    freed after the forward; the backward scatters into the selected rows of ``W_enc`` / ``bias`` only.
    """

    @staticmethod
    def forward(ctx, x, W_enc, bias, k: int, batch: bool, dead: Tensor | None, aux_k: int):
        n, d_sae = x.shape[0], W_enc.shape[0]
        pre = torch.addmm(bias, x, W_enc.t())
        if batch:
            flat_vals, flat_idx = pre.view(-1).topk(min(k * n, pre.numel()), sorted=False)
            flat_idx, perm = flat_idx.sort()
            vals = flat_vals[perm]
            rows, cols = flat_idx // d_sae, flat_idx % d_sae
        else:
            vals, idx = pre.topk(k, dim=1, sorted=False)
            rows = torch.arange(n, device=x.device).repeat_interleave(k)
            cols, vals = idx.reshape(-1), vals.reshape(-1)
        vals = vals.relu()
        if dead is not None and aux_k > 0 and bool(dead.any()):
            ka = min(aux_k, int(dead.sum()))
            a_vals, a_idx = pre.masked_fill_(~dead, float("-inf")).topk(ka, dim=1, sorted=False)
            a_vals = a_vals.relu().reshape(-1)
            a_rows = torch.arange(n, device=x.device).repeat_interleave(ka)
            a_cols = a_idx.reshape(-1)
        else:
            a_vals = vals.new_zeros(0)
            a_rows = a_cols = rows.new_zeros(0)
        del pre
        ctx.save_for_backward(x, torch.cat([rows, a_rows]), torch.cat([cols, a_cols]), torch.cat([vals, a_vals]))
        ctx.d_sae, ctx.n_main = d_sae, vals.numel()
        ctx.mark_non_differentiable(rows, cols, a_rows, a_cols)
        return vals, rows, cols, a_vals, a_rows, a_cols

    @staticmethod
    def backward(ctx, g_vals, _r, _c, g_avals, _ar, _ac):
        x, rows, cols, vals = ctx.saved_tensors
        if g_vals is None:
            g_vals = vals.new_zeros(ctx.n_main)
        if g_avals is None:
            g_avals = vals.new_zeros(vals.numel() - ctx.n_main)
        g = torch.cat([g_vals, g_avals]) * (vals > 0)
        gw, gb = _weight_grad(x.to(g.dtype), rows, cols, g, ctx.d_sae)
        return None, gw, gb, None, None, None, None


def sparse_encode(x: Tensor, W_enc: Tensor, bias: Tensor, k: int, *, batch: bool = False,
                  dead: Tensor | None = None, aux_k: int = 0):
    """See :class:`SparseEncode`. ``x`` gets no gradient (it is data)."""
    return SparseEncode.apply(x.detach(), W_enc, bias, k, batch, dead, aux_k)


def dense_to_coo(dense: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(vals, rows, cols) of the nonzeros of a ``[N, d_sae]`` matrix, row-major (so rows are sorted)."""
    rows, cols = dense.nonzero(as_tuple=True)
    return dense[rows, cols], rows, cols


class JumpReLU(torch.autograd.Function):
    """``f = z·H(z − θ)`` and ``L0 = mean_tokens Σ_i H(z_i − θ_i)`` with θ = exp(log_threshold).

    Straight-through pseudo-derivatives with a rectangle kernel K(u) = 1[|u| < ½] of bandwidth ε (Rajamanoharan et
    al. 2024): ∂f/∂z = H(z − θ); ∂f/∂θ = −(θ/ε)K((z−θ)/ε); ∂L0/∂θ = −(1/ε)K((z−θ)/ε); no gradient from L0 to z.
    One fused function so the ``[N, d_sae]`` temporaries are formed once.
    """

    @staticmethod
    def forward(ctx, pre: Tensor, log_threshold: Tensor, bandwidth: float):
        theta = log_threshold.exp()
        mask = pre > theta
        f = pre * mask
        l0 = mask.sum(dtype=pre.dtype) / pre.shape[0]
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return f, l0

    @staticmethod
    def backward(ctx, g_f, g_l0):
        pre, theta = ctx.saved_tensors
        eps, n = ctx.bandwidth, pre.shape[0]
        mask = pre > theta
        window = (pre - theta).abs_() < eps / 2
        g_pre = None
        if g_f is None:
            g_f = torch.zeros_like(pre)
        if ctx.needs_input_grad[0]:
            g_pre = g_f * mask
        g_theta = (torch.where(window, g_f, 0.0).sum(0)) * (-theta / eps)
        if g_l0 is not None:
            g_theta = g_theta - window.sum(0, dtype=pre.dtype) * (g_l0 / (eps * n))
        return g_pre, g_theta * theta, None


def jumprelu(pre: Tensor, log_threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """(codes, mean L0) — see :class:`JumpReLU`."""
    return JumpReLU.apply(pre, log_threshold, bandwidth)
