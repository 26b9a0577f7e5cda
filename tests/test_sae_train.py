"""Training recipe: every architecture learns a known sparse dictionary; schedule, median, buffer, resume."""
import math

import pytest
import torch

from saefd_ray.sae import (MixingBuffer, SAEConfig, SAETrainer, TrainerConfig, build_sae, fast_lr, fit_schedule,
                           geometric_median, reconstruction_metrics, sparsity_warmup)

D_IN, N_ATOMS, S, D_SAE = 32, 64, 4, 128


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_dictionary_problem(n=20_000, seed=0):
    """x = Σ_{4 random atoms} c·atom + offset, unit-norm ground-truth atoms, c ~ U(1, 2)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(N_ATOMS, D_IN, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.rand(n, N_ATOMS, generator=g).argsort(1)[:, :S]
    codes = torch.zeros(n, N_ATOMS).scatter_(1, idx, 1 + torch.rand(n, S, generator=g))
    return codes @ atoms + 0.3, atoms


def chunks(x, size=1000):
    return lambda start: (x[i: i + size] for i in range(start * size, x.shape[0], size))


def train(arch, steps, x, **cfg_kw):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(arch, D_IN, D_SAE, **cfg_kw), seed=0)
    tr = SAETrainer(sae, TrainerConfig(total_steps=steps, lr=3e-3, lr_end=3e-4, lr_warmup_steps=steps // 20,
                                       lr_decay_steps=steps // 5, sparsity_warmup_steps=steps // 4,
                                       dead_window_tokens=20_000))
    epoch = 0
    while tr.step_count < steps:
        tr.train(MixingBuffer(chunks(x), capacity=4096, batch_size=256, seed=epoch), steps - tr.step_count)
        epoch += 1
    return sae, tr


CASES = {  # arch: (steps, config, max eval L0)
    "topk": (600, {"k": 4}, 4.0),
    "batchtopk": (800, {"k": 4}, 6.0),
    "standard": (1500, {"sparsity_coefficient": 0.4}, 16.0),
    "gated": (1000, {"sparsity_coefficient": 1.0}, 10.0),
    "jumprelu": (1000, {"sparsity_coefficient": 0.1, "jumprelu_init_threshold": 0.1, "jumprelu_bandwidth": 0.1}, 8.0),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_learns_sparse_dictionary(arch):
    x, atoms = sparse_dictionary_problem()
    steps, kw, max_l0 = CASES[arch]
    sae, tr = train(arch, steps, x, **kw)
    sae.eval()
    m = reconstruction_metrics(sae, [x[:4000]])
    assert m["fvu"] < 0.1, m
    assert m["l0"] <= max_l0, m
    assert m["l0"] >= 2.0, m  # sparse, but not collapsed
    if arch == "topk":
        assert m["l0"] == pytest.approx(4.0)
    if arch == "batchtopk":  # threshold (inference) sparsity tracks the batch-level k
        assert float(sae.threshold) > 0 and 2.0 <= m["l0"] <= 6.0
    # the learned decoder recovers most ground-truth atoms (max cosine over latents)
    cos = (atoms @ torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).t()).max(1).values
    assert float((cos > 0.9).float().mean()) > 0.7, cos
    # decoder rows are kept at unit norm
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-4, rtol=0)


def test_geometric_median_weiszfeld():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(500, 5, generator=g) + torch.tensor([3.0, -1.0, 0.0, 2.0, 1.0])
    outliers = torch.full((40, 5), 1000.0)
    gm = geometric_median(torch.cat([pts, outliers]))
    assert (gm - pts.mean(0)).norm() < 0.5  # robust: the mean would move by ~70
    # optimality: the gradient Σ (y − p)/‖y − p‖ vanishes at the median
    allp = torch.cat([pts, outliers]).double()
    grad = ((gm.double() - allp) / (gm.double() - allp).norm(dim=1, keepdim=True)).sum(0)
    assert grad.norm() < 1e-2 * allp.shape[0]
    # 1-D: the median
    assert geometric_median(torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]])).item() == pytest.approx(2.0, abs=1e-3)


def test_fast_lr_schedule_shape():
    kw = dict(lr=7e-5, total_steps=200_000, warmup_steps=16_000, lr_end=7e-6, decay_steps=64_000)
    lr = [fast_lr(s, **kw) for s in range(200_000)]
    assert lr[0] == pytest.approx(7e-5 / 16_000)
    assert lr[15_999] == pytest.approx(7e-5)  # end of linear warm-up
    assert all(a <= b for a, b in zip(lr[:16_000], lr[1:16_000]))
    mid = 16_000 + (136_000 - 16_000) // 2
    assert lr[mid] == pytest.approx((7e-5 + 7e-6) / 2, rel=1e-3)  # cosine half-way
    assert all(a >= b - 1e-15 for a, b in zip(lr[16_000:136_000], lr[16_001:136_000]))
    assert lr[136_000] == pytest.approx(7e-6)  # cosine reaches lr_end where the linear decay starts
    assert lr[168_000] == pytest.approx(3.5e-6, rel=1e-3)  # linear
    assert lr[-1] == pytest.approx(7e-6 / 64_000, rel=1e-3) and lr[-1] > 0
    assert fast_lr(200_000, **kw) == 0.0
    # short runs: phases clipped, never negative, warm-up still reaches the peak
    short = [fast_lr(s, lr=1.0, total_steps=50, warmup_steps=100, lr_end=0.1, decay_steps=100) for s in range(50)]
    assert short[-1] == pytest.approx(1.0) and min(short) > 0
    assert sparsity_warmup(0, 10) == pytest.approx(0.1) and sparsity_warmup(9, 10) == 1.0
    assert sparsity_warmup(5, 0) == 1.0


def _tokens(n_chunks=10, size=100, d=3):
    """Token t has value t in every dim, so the stream's identity is visible in each row."""
    return [torch.arange(i * size, (i + 1) * size, dtype=torch.float32)[:, None].expand(size, d).clone()
            for i in range(n_chunks)]


def test_mixing_buffer_contract():
    data = _tokens()
    buf = MixingBuffer(lambda s: iter(data[s:]), capacity=300, batch_size=50, seed=0, drop_last=False)
    seen, consumed_at = [], []
    for b in buf:
        assert b.shape[1] == 3
        seen.append(b[:, 0])
        consumed_at.append(buf.chunks_consumed)
    seen_all = torch.cat(seen).long()
    assert sorted(seen_all.tolist()) == list(range(1000))  # every token exactly once
    # first serve: from a full buffer of 300 tokens only 150 are served, all among the first 3 chunks
    first = torch.cat(seen[:3]).long()
    assert first.max() < 300 and consumed_at[0] == 3
    # mixing: the first batch is not one contiguous run of the stream
    assert seen[0].long().diff().abs().max() > 1
    # half kept: some tokens of the first fill are served after a refill with newer tokens
    later = torch.cat(seen[3:6]).long()
    assert bool((later < 300).any()) and bool((later >= 300).any())
    # drop_last=True: only full batches
    sizes = [b.shape[0] for b in MixingBuffer(lambda s: iter(data[s:]), capacity=300, batch_size=64, seed=0)]
    assert set(sizes) == {64} and sum(sizes) > 1000 - 64 - 1


def test_mixing_buffer_resume_is_identical():
    data = _tokens()
    ref = [b.clone() for b in MixingBuffer(lambda s: iter(data[s:]), capacity=300, batch_size=50, seed=3)]
    buf = MixingBuffer(lambda s: iter(data[s:]), capacity=300, batch_size=50, seed=3)
    it, got = iter(buf), []
    for _ in range(7):
        got.append(next(it))
    state = buf.state_dict()
    resumed = MixingBuffer(lambda s: iter(data[s:]), capacity=300, batch_size=50, seed=999)
    resumed.load_state_dict(state)
    got += list(resumed)
    assert len(got) == len(ref)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    with pytest.raises(ValueError):
        MixingBuffer(data, capacity=10, batch_size=50)


@pytest.mark.parametrize("arch", ["gated", "topk", "batchtopk", "jumprelu"])
def test_trainer_save_resume_gives_identical_continuation(arch, tmp_path):
    from saefd_ray.sae import load_saelens, load_trainer_state, save_checkpoint

    x, _ = sparse_dictionary_problem(n=6000)
    kw = {"k": 4} if "topk" in arch else {}
    cfg = TrainerConfig(total_steps=40, lr=3e-3, lr_warmup_steps=5, lr_decay_steps=10, sparsity_warmup_steps=10,
                        dead_window_tokens=384)  # small window: AuxK and dead counters are exercised

    def fresh():
        return SAETrainer(build_sae(SAEConfig(arch, D_IN, D_SAE, dtype="float64", **kw), seed=0), cfg)

    def batches(tr_buf):
        return iter(tr_buf)

    a = fresh()
    buf_a = MixingBuffer(chunks(x.double(), 500), capacity=1024, batch_size=128, seed=1)
    it_a = batches(buf_a)
    a.train(it_a, 15)
    save_checkpoint(a.sae, {**a.state_dict(), "buffer": buf_a.state_dict()}, tmp_path / "ck")
    hist_a = a.train(it_a, 15)

    state = load_trainer_state(tmp_path / "ck")
    b = SAETrainer(load_saelens(tmp_path / "ck"), cfg)
    b.load_state_dict(state)
    buf_b = MixingBuffer(chunks(x.double(), 500), capacity=1024, batch_size=128, seed=0)
    buf_b.load_state_dict(state["buffer"])
    b.train(iter(buf_b), 15)

    assert b.step_count == a.step_count == 30
    assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
    for (name, p), q in zip(a.sae.named_parameters(), b.sae.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    if arch in ("topk", "batchtopk"):  # the resumed part ran with dead latents, i.e. through AuxK
        assert any("auxk" in m for m in hist_a)


def test_dead_latent_window_and_mask_from_wrapper():
    sae = build_sae(SAEConfig("topk", 8, 16, k=2), seed=0)
    tr = SAETrainer(sae, TrainerConfig(dead_window_tokens=100))
    fired = torch.zeros(16, dtype=torch.bool)
    fired[:4] = True
    tr.update_dead(fired, 60)
    assert not tr.dead_mask().any()
    fired2 = torch.zeros(16, dtype=torch.bool)
    fired2[0] = True
    tr.update_dead(fired2, 60)  # latents 4.. have now gone 120 tokens without firing
    assert tr.dead_mask().tolist() == [False] * 4 + [True] * 12
    assert tr.tokens_seen == 120
    assert math.isclose(tr.state_dict()["tokens_since_fired"][1].item(), 60)


def test_fast_schedule_is_scaled_to_a_short_run():
    """1M tokens at batch 4096 = 244 steps: FAST's 16k / 64k / 10k lengths would keep the whole run in warm-up."""
    sae = build_sae(SAEConfig("standard", D_IN, D_SAE), seed=0)
    tr = SAETrainer(sae, TrainerConfig(total_steps=244))  # FAST defaults otherwise
    assert (tr.schedule["lr_warmup_steps"], tr.schedule["lr_decay_steps"], tr.schedule["sparsity_warmup_steps"]) == \
        (24, 98, 15) and tr.schedule["scaled"]  # warm-up + decay = half the run, FAST's proportions
    assert tr.lr_at(23) == pytest.approx(7e-5)  # the peak is reached
    assert tr.lr_at(243) < 7e-6  # and the run ends in the final decay
    tr.step_count = 243
    metrics = tr.step(torch.randn(64, D_IN))
    assert metrics["sparsity_scale"] == 1.0 and metrics["lr"] < 7e-6
    fits = fit_schedule(200_000, 16_000, 64_000, 10_000)  # a run FAST's lengths fit: unchanged
    assert not fits["scaled"] and fits["lr_warmup_steps"] == 16_000 and fits["sparsity_warmup_steps"] == 10_000
    only_sparsity = fit_schedule(100, 10, 20, 500)
    assert (only_sparsity["lr_warmup_steps"], only_sparsity["sparsity_warmup_steps"]) == (10, 50)


def test_schedule_used_is_in_the_sae_report():
    from saefd_ray.stream.config import validate_sae
    from saefd_ray.stream.report import describe_schedule
    from saefd_ray.stream.run import schedule_used

    config = validate_sae({"data": {"sources": [{"kind": "file", "path": "x.json"}]}})  # 1M tokens, batch 4096
    line = describe_schedule(schedule_used(config))
    assert line.startswith("schedule: 244 steps; LR warm-up 24, cosine, linear decay over the last 98; sparsity "
                           "warm-up 15") and "configured 16000 / 64000 / 10000 do not fit the run" in line


def test_b_dec_init_reads_the_first_mixing_buffer_fill():
    data = [torch.randn(100, 3, generator=torch.Generator().manual_seed(i)) * (1 + i) for i in range(10)]
    buf = MixingBuffer(lambda s: iter(data[s:]), capacity=300, batch_size=50, seed=0)
    it = iter(buf)
    first_batch = next(it)
    fill = buf.first_fill
    assert fill.shape == (300, 3)  # the whole fill, not the batch
    torch.testing.assert_close(fill[fill[:, 0].argsort()], torch.cat(data[:3])[torch.cat(data[:3])[:, 0].argsort()])
    sae = build_sae(SAEConfig("standard", 3, 8), seed=0)
    tr = SAETrainer(sae, TrainerConfig(total_steps=10))
    tr.init_b_dec(fill)
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(torch.cat(data[:3])))
    assert not torch.allclose(sae.b_dec.detach(), geometric_median(first_batch), atol=1e-3)
    next(it)
    resumed = MixingBuffer(lambda s: iter(data[s:]), capacity=300, batch_size=50, seed=0)
    resumed.load_state_dict(buf.state_dict())
    next(iter(resumed))
    assert resumed.first_fill is None  # a resumed buffer has no first fill (b_dec was initialised before)
    # the union of two ranks' fills, by reduced sums, without gathering them: here both "ranks" hold the same fill
    torch.testing.assert_close(geometric_median(fill, all_reduce=lambda t: t * 2), geometric_median(fill))
