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


def _offsets(segments: Tensor, n_segments: int) -> Tensor:
    """Start position of each segment in a sorted segment-id list (empty segments allowed)."""
    counts = torch.bincount(segments, minlength=n_segments)
    offsets = torch.zeros(n_segments, dtype=torch.long, device=segments.device)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    return offsets


def _segment_sum(table: Tensor, index: Tensor, segments: Tensor, n_segments: int, weights: Tensor) -> Tensor:
    """out[s] = Σ_{j: segments_j = s} weights_j · table[index_j]; ``segments`` must be sorted ascending."""
    return F.embedding_bag(index, table, _offsets(segments, n_segments), mode="sum",
                           per_sample_weights=weights.to(table.dtype))


def _row_dots(a: Tensor, rows: Tensor, b: Tensor, cols: Tensor) -> Tensor:
    """d_j = ⟨a[rows_j], b[cols_j]⟩ (``rows`` sorted): the per-sample-weight gradient of ``embedding_bag``.

    ATen's fused kernel avoids the ``[nnz, d_in]`` gather; it is a private op, so fall back to chunks if it moves.
    """
    op = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if op is not None and a.dtype == b.dtype:
        try:
            return op(a, b, cols, _offsets(rows, a.shape[0]), rows, 0, -1)
        except (RuntimeError, TypeError):  # pragma: no cover - signature drift across torch versions
            pass
    out = torch.empty(rows.numel(), dtype=a.dtype, device=a.device)
    for s in range(0, rows.numel(), _GATHER_CHUNK):
        e = min(rows.numel(), s + _GATHER_CHUNK)
        out[s:e] = (a.index_select(0, rows[s:e]) * b.index_select(0, cols[s:e])).sum(1)
    return out


def _sort_by_latent(cols: Tensor) -> tuple[Tensor, Tensor]:
    """Permutation grouping entries by latent (int32 keys: several times faster than int64 on CPU)."""
    key = cols.to(torch.int32) if cols.numel() and int(cols.max()) < 2**31 else cols
    sorted_cols, order = torch.sort(key)
    return sorted_cols.long(), order


def _weight_grad(x: Tensor, rows: Tensor, cols: Tensor, g: Tensor, n_latents: int) -> tuple[Tensor, Tensor]:
    """(Σ_j g_j x[rows_j] per latent, Σ_j g_j per latent): encoder weight and bias gradients, active latents only."""
    sorted_cols, order = _sort_by_latent(cols)
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
            g_vals = _row_dots(grad_out, rows, W_dec, cols).to(vals.dtype)
        if ctx.needs_input_grad[3]:
            sorted_cols, order = _sort_by_latent(cols)
            g_w = _segment_sum(grad_out, rows[order], sorted_cols, W_dec.shape[0], vals[order])
        return g_vals, None, None, g_w, None, None


def sparse_decode(vals: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, n_rows: int, width: int | None = None):
    """Decoder product without the bias; ``rows`` sorted ascending. ``width``: entries per row if all rows equal."""
    return SparseDecode.apply(vals, rows, cols, W_dec, n_rows, width)


BATCHTOPK_CANDIDATES = 4  # per-row candidates, as a multiple of k, for the two-stage batch top-k


def _batch_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``k·N`` entries of ``pre [N, d_sae]`` as row-sorted COO.

    Two stages (a full ``[N·d_sae]`` top-k is several times slower on CPU): each row's top ``c·k`` candidates, then
    the batch top ``k·N`` among those. Exact unless some row had all its candidates selected (it might own more);
    then it falls back to the full top-k.
    """
    n, d_sae = pre.shape
    total = min(k * n, pre.numel())
    kk = min(d_sae, BATCHTOPK_CANDIDATES * k)
    cand_v, cand_i = pre.topk(kk, dim=1, sorted=False)
    sel_v, sel = cand_v.view(-1).topk(total, sorted=False)
    if kk < d_sae and int(torch.bincount(sel // kk, minlength=n).max()) >= kk:
        sel_v, flat = pre.view(-1).topk(total, sorted=False)
    else:
        flat = (sel // kk) * d_sae + cand_i.view(-1)[sel]
    flat, perm = flat.sort()
    return sel_v[perm], flat // d_sae, flat % d_sae


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
            vals, rows, cols = _batch_topk(pre, k)
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


class ReLUDecodeL1(torch.autograd.Function):
    """``f = ReLU(pre)``, ``x̂ = f W + b`` and ``L1 = mean_tokens Σ_i f_i w_i`` in one function.

    Why fused: autograd would materialise the L1 gradient as a separate ``[N, d_sae]`` add and the ReLU backward as a
    new tensor. Here the L1 gradient rides in the bias of the backward GEMM (``addmm``) and the ReLU mask is applied
    in place, so the step is the four GEMMs plus few memory passes. Returns (x̂, f, L1); f carries no gradient.
    """

    @staticmethod
    def forward(ctx, pre: Tensor, W: Tensor, b: Tensor, w: Tensor):
        f = pre.relu()
        colsum = f.sum(0)
        x_hat = torch.addmm(b, f, W)
        ctx.save_for_backward(f, W, colsum, w)
        ctx.mark_non_differentiable(f)
        return x_hat, f, (colsum * w).sum() / pre.shape[0]

    @staticmethod
    def backward(ctx, g_x, _g_f, g_l1):
        f, W, colsum, w = ctx.saved_tensors
        n = f.shape[0]
        scale = (g_l1 / n) if g_l1 is not None else torch.zeros((), dtype=f.dtype, device=f.device)
        g_pre = g_W = g_b = g_w = None
        if ctx.needs_input_grad[0]:
            if g_x is None:
                g_pre = (w * scale).expand_as(f).clone()
            else:
                g_pre = torch.addmm(w * scale, g_x, W.t())
            g_pre.masked_fill_(f <= 0, 0.0)
        if g_x is not None and ctx.needs_input_grad[1]:
            g_W = f.t() @ g_x
        if g_x is not None and ctx.needs_input_grad[2]:
            g_b = g_x.sum(0)
        if ctx.needs_input_grad[3]:
            g_w = colsum * scale
        return g_pre, g_W, g_b, g_w


def relu_decode_l1(pre: Tensor, W: Tensor, b: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """See :class:`ReLUDecodeL1` (dense path; the caller switches to sparse kernels for sparse codes)."""
    return ReLUDecodeL1.apply(pre, W, b, w)
