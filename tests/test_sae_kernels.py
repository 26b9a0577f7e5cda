"""Every sparse fast path against its dense autograd reference: values and gradients."""
import pytest
import torch

from saefd_ray.sae import SAEConfig, SparseCodes, build_sae
from saefd_ray.sae.kernels import dense_to_coo, jumprelu, sparse_decode, sparse_encode


pytestmark = pytest.mark.usefixtures("one_thread")


torch.manual_seed(0)
ATOL = dict(rtol=1e-4, atol=1e-5)


def _leaf(t):
    return t.clone().double().requires_grad_(True)


def test_sparse_decode_matches_dense():
    n, d_sae, d, k = 7, 40, 12, 5
    W = _leaf(torch.randn(d_sae, d))
    idx = torch.stack([torch.randperm(d_sae)[:k] for _ in range(n)])
    vals = _leaf(torch.rand(n, k))
    rows = torch.arange(n).repeat_interleave(k)
    out = sparse_decode(vals.reshape(-1), rows, idx.reshape(-1), W, n, k)
    g = torch.randn(n, d, dtype=torch.float64)
    gv, gW = torch.autograd.grad((out * g).sum(), (vals, W))

    W2, vals2 = _leaf(W.detach()), _leaf(vals.detach())
    dense = torch.zeros(n, d_sae, dtype=torch.float64).scatter(1, idx, vals2)
    ref = dense @ W2
    rv, rW = torch.autograd.grad((ref * g).sum(), (vals2, W2))
    torch.testing.assert_close(out, ref, **ATOL)
    torch.testing.assert_close(gv, rv, **ATOL)
    torch.testing.assert_close(gW, rW, **ATOL)


def test_sparse_decode_variable_rows_and_empty_rows():
    n, d_sae, d = 6, 30, 8
    dense = torch.rand(n, d_sae).double() * (torch.rand(n, d_sae) < 0.2)
    dense[2] = 0  # a token with no active latent
    W = _leaf(torch.randn(d_sae, d))
    vals, rows, cols = dense_to_coo(dense)
    vals = _leaf(vals)
    out = sparse_decode(vals, rows, cols, W, n)
    (out.pow(2).sum()).backward()
    W2, d2 = _leaf(W.detach()), _leaf(dense)
    ref = d2 @ W2
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out, ref, **ATOL)
    torch.testing.assert_close(W.grad, W2.grad, **ATOL)
    torch.testing.assert_close(vals.grad, d2.grad[rows, cols], **ATOL)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("with_aux", [False, True])
def test_sparse_encode_matches_dense(batch, with_aux):
    n, d_sae, d, k, aux_k = 9, 50, 16, 4, 6
    x = torch.randn(n, d, dtype=torch.float64)
    W, b = _leaf(torch.randn(d_sae, d)), _leaf(torch.randn(d_sae) * 0.1)
    dead = (torch.arange(d_sae) % 3 == 0) if with_aux else None
    vals, rows, cols, av, ar, ac = sparse_encode(x, W, b, k, batch=batch, dead=dead, aux_k=aux_k)
    gv, gav = torch.randn_like(vals), torch.randn_like(av)
    loss = (vals * gv).sum() + (av * gav).sum()
    gW, gb = torch.autograd.grad(loss, (W, b))

    W2, b2 = _leaf(W.detach()), _leaf(b.detach())
    pre = (x @ W2.t() + b2).relu()
    if batch:
        keep = torch.zeros(n * d_sae, dtype=torch.bool)
        keep[pre.detach().reshape(-1).topk(k * n).indices] = True
        keep = keep.view(n, d_sae)
    else:
        keep = torch.zeros(n, d_sae, dtype=torch.bool).scatter(1, pre.detach().topk(k, dim=1).indices, True)
    sel = pre * keep
    ref_loss = (sel[rows, cols] * gv).sum()
    torch.testing.assert_close(vals, sel[rows, cols], **ATOL)
    assert torch.equal(torch.sort(cols[rows == 0]).values, torch.nonzero(keep[0]).flatten())
    if with_aux:
        masked = torch.where(dead, (x @ W2.t() + b2), float("-inf"))
        a_idx = masked.detach().topk(aux_k, dim=1).indices
        assert bool(dead[ac].all())
        assert torch.equal(torch.sort(ac.view(n, -1), 1).values, torch.sort(a_idx, 1).values)
        ref_loss = ref_loss + (masked.relu()[ar, ac] * gav).sum()
    rW, rb = torch.autograd.grad(ref_loss, (W2, b2))
    torch.testing.assert_close(gW, rW, **ATOL)
    torch.testing.assert_close(gb, rb, **ATOL)


def test_sparse_encode_gives_no_gradient_to_input():
    x = torch.randn(4, 8, requires_grad=True)
    W, b = torch.randn(20, 8, requires_grad=True), torch.zeros(20, requires_grad=True)
    vals, *_ = sparse_encode(x, W, b, 3)
    vals.sum().backward()
    assert x.grad is None and W.grad is not None


def _jumprelu_reference(z, log_t, eps):
    """Straightforward autograd version: rectangle STE written with a custom-free trick (value + detached diff)."""
    theta = log_t.exp()
    mask = (z > theta).to(z)
    k = ((z - theta).abs() < eps / 2).to(z)
    # pseudo-gradients: d f/d θ = -(θ/ε)K, d H/d θ = -(1/ε)K, none to z from H
    f = z * mask + (-(theta / eps) * k * (theta - theta.detach()))
    h = mask + (-(1 / eps) * k * (theta - theta.detach()))
    return f, h.sum(-1).mean()


def test_jumprelu_kernel_matches_reference():
    n, d_sae, eps = 64, 30, 0.05
    z = _leaf(torch.randn(n, d_sae) * 0.2)
    lt = _leaf(torch.log(torch.full((d_sae,), 0.1)))
    f, l0 = jumprelu(z, lt, eps)
    gf = torch.randn(n, d_sae, dtype=torch.float64)
    gz, glt = torch.autograd.grad((f * gf).sum() + 0.7 * l0, (z, lt))
    z2, lt2 = _leaf(z.detach()), _leaf(lt.detach())
    f2, l02 = _jumprelu_reference(z2, lt2, eps)
    rz, rlt = torch.autograd.grad((f2 * gf).sum() + 0.7 * l02, (z2, lt2))
    torch.testing.assert_close(f, f2, **ATOL)
    torch.testing.assert_close(l0, l02, **ATOL)
    torch.testing.assert_close(gz, rz, **ATOL)
    torch.testing.assert_close(glt, rlt, **ATOL)
    assert glt.abs().sum() > 0  # some pre-activations fall in the kernel window


def _dense_topk_reference(sae, x, dead, batch):
    """Plain autograd TopK/BatchTopK SAE loss (mse + scaled AuxK) with b_dec subtracted from the input."""
    c = sae.cfg
    p = {k: _leaf(v.detach()) for k, v in sae.named_parameters()}
    pre = ((x - p["b_dec"]) @ p["W_enc"].t() + p["b_enc"]).relu()
    if batch:
        keep = torch.zeros(pre.numel(), dtype=torch.bool)
        keep[pre.detach().reshape(-1).topk(c.k * x.shape[0]).indices] = True
        keep = keep.view_as(pre)
    else:
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.detach().topk(c.k, dim=1).indices, True)
    x_hat = (pre * keep) @ p["W_dec"] + p["b_dec"]
    err = x_hat - x
    loss = err.pow(2).sum(-1).mean()
    if dead is not None and dead.any():
        ka = min(c.aux_k, int(dead.sum()))
        full = (x - p["b_dec"]) @ p["W_enc"].t() + p["b_enc"]
        masked = torch.where(dead, full, float("-inf"))
        akeep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, masked.detach().topk(ka, dim=1).indices, True)
        e_hat = (masked.relu() * akeep).nan_to_num() @ p["W_dec"]
        scale = min(float(dead.sum()) / c.aux_k, 1.0)
        loss = loss + c.aux_k_coefficient * scale * (e_hat + err.detach()).pow(2).sum(-1).mean()
    grads = torch.autograd.grad(loss, list(p.values()))
    return loss, x_hat, dict(zip(p, grads)), (pre * keep).detach()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [0, 20])
def test_topk_sae_forward_backward_matches_dense(arch, n_dead):
    cfg = SAEConfig(arch, d_in=16, d_sae=64, k=4, aux_k=8, dtype="float64")
    sae = build_sae(cfg, seed=1)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16) * 0.3)
        sae.b_enc.copy_(torch.randn(64) * 0.1)
    x = torch.randn(10, 16, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:n_dead] = True
    out = sae(x, dead_mask=dead)
    out.loss.backward()
    ref_loss, ref_xhat, ref_grads, ref_codes = _dense_topk_reference(sae, x, dead, arch == "batchtopk")
    torch.testing.assert_close(out.loss, ref_loss, **ATOL)
    torch.testing.assert_close(out.x_hat, ref_xhat, **ATOL)
    for name, g in ref_grads.items():
        torch.testing.assert_close(dict(sae.named_parameters())[name].grad, g, **ATOL, msg=name)
    assert isinstance(out.codes, SparseCodes)
    torch.testing.assert_close(out.codes.to_dense(64), ref_codes, **ATOL)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated"])
def test_sparse_training_decode_matches_dense(arch, monkeypatch):
    """Dense-code architectures switch to the sparse decoder when codes are sparse: same values and grads."""
    import saefd_ray.sae.base as base

    kw = {"jumprelu_init_threshold": 0.5} if arch == "jumprelu" else {}
    sae = build_sae(SAEConfig(arch, d_in=16, d_sae=64, dtype="float64", **kw), seed=2)
    x = torch.randn(12, 16, dtype=torch.float64)
    results = []
    for density in (0.0, 1.1):  # never / always sparse path
        monkeypatch.setattr(base, "SPARSE_DECODE_DENSITY", density)
        sae.zero_grad()
        out = sae(x)
        out.loss.backward()
        results.append((out.loss.detach(), {k: p.grad.clone() for k, p in sae.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], **ATOL)
    for k in results[0][1]:
        torch.testing.assert_close(results[0][1][k], results[1][1][k], **ATOL, msg=k)


def test_bias_folding_gives_b_dec_the_input_centring_gradient():
    """(x − b_dec)Wᵀ folded into the bias: b_dec's gradient equals the unfolded autograd version."""
    sae = build_sae(SAEConfig("standard", d_in=8, d_sae=24, dtype="float64"), seed=3)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(8))
    x = torch.randn(5, 8, dtype=torch.float64)
    sae(x).loss.backward()
    p = {k: _leaf(v.detach()) for k, v in sae.named_parameters()}
    f = ((x - p["b_dec"]) @ p["W_enc"].t() + p["b_enc"]).relu()
    x_hat = f @ p["W_dec"] + p["b_dec"]
    loss = (x_hat - x).pow(2).sum(-1).mean() + 5.0 * (f * p["W_dec"].norm(dim=1)).sum(-1).mean()
    loss.backward()
    for k, v in p.items():
        torch.testing.assert_close(dict(sae.named_parameters())[k].grad, v.grad, **ATOL, msg=k)


def test_fused_relu_decode_l1_matches_autograd():
    from saefd_ray.sae.kernels import relu_decode_l1

    pre, W, b, w = (_leaf(torch.randn(*s)) for s in ((9, 20), (20, 7), (7,), (20,)))
    x_hat, f, l1 = relu_decode_l1(pre, W, b, w)
    gx = torch.randn(9, 7, dtype=torch.float64)
    grads = torch.autograd.grad((x_hat * gx).sum() + 0.3 * l1, (pre, W, b, w))
    p2, W2, b2, w2 = (_leaf(t.detach()) for t in (pre, W, b, w))
    f2 = p2.relu()
    ref = (f2 @ W2 + b2, (f2 * w2).sum(-1).mean())
    rgrads = torch.autograd.grad((ref[0] * gx).sum() + 0.3 * ref[1], (p2, W2, b2, w2))
    torch.testing.assert_close(x_hat, ref[0], **ATOL)
    torch.testing.assert_close(l1, ref[1], **ATOL)
    torch.testing.assert_close(f, f2.detach(), **ATOL)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r, **ATOL)
    # frozen decoder (Gated's auxiliary path): no gradient is formed for W or b
    _, _, l1b = relu_decode_l1(pre, W.detach(), b.detach(), w)
    assert torch.autograd.grad(l1b, pre) is not None


@pytest.mark.parametrize("candidates", [1, 4, 100])
def test_batch_topk_two_stage_is_exact(candidates, monkeypatch):
    """The candidate shortcut and its fallback (a row owning more than its candidates) select the true batch top-k."""
    import saefd_ray.sae.kernels as K

    monkeypatch.setattr(K, "BATCHTOPK_CANDIDATES", candidates)
    pre = torch.randn(16, 40)
    pre[3] += 5.0  # one row dominates the batch: it owns far more than k of the top k·N
    vals, rows, cols = K._batch_topk(pre, 3)
    ref = pre.view(-1).topk(48).indices
    assert torch.equal(torch.sort(rows * 40 + cols).values, torch.sort(ref).values)
    torch.testing.assert_close(vals, pre[rows, cols])
    assert bool((rows.diff() >= 0).all())
