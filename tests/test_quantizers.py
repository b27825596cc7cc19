"""The quantizer adapter: code order, round trips, truncation, bitrate arithmetic, usage metrics."""

import math

import pytest
import torch

from neurocodec.codecs.checkpoint import load_codec
from neurocodec.codecs.lfq_balance import CodeBalance, decorrelation_loss, fit_balanced_thresholds, lfq_entries
from neurocodec.codecs.quantizers import CodebookUsage, Quantizer, QuantizerConfig, codebook_metrics, usage_from_histogram
from neurocodec.config import ConfigError, from_dict

ALL = {
    "grvq": QuantizerConfig(kind="grvq", groups=2, num_quantizers=3, codebook_size=32),
    "rvq": QuantizerConfig(kind="rvq", num_quantizers=4, codebook_size=32, quantize_dropout=True),
    "fsq": QuantizerConfig(kind="fsq", levels=[8, 5, 5, 5]),
    "rfsq": QuantizerConfig(kind="rfsq", levels=[8, 5, 5, 5], num_quantizers=3),
    "vq": QuantizerConfig(kind="vq", codebook_size=64, codebook_dim=8),
    "lfq": QuantizerConfig(kind="lfq", codebook_size=256),
}


def trained(cfg, dim=16, seed=0):
    torch.manual_seed(seed)
    q = Quantizer(dim, cfg)
    q.initialize_codebooks(torch.randn(4, dim, 200))  # k-means init of every layer
    q.train()
    q(torch.randn(4, dim, 200))  # an EMA update
    return q.eval()


@pytest.mark.parametrize("kind", list(ALL))
def test_round_trip_and_shapes(kind):
    q = trained(ALL[kind])
    z = torch.randn(2, 16, 30)
    codes = q.encode(z)
    assert codes.shape == (2, q.total_codebooks, 30) and codes.dtype == torch.long
    for k, card in enumerate(q.cardinalities):
        assert 0 <= int(codes[:, k].min()) and int(codes[:, k].max()) < card
    # decoding the codes gives the library's own quantized output in eval mode
    torch.testing.assert_close(q.decode(codes), q(z).z_q, atol=1e-5, rtol=0)


def test_grvq_code_order_is_layer_major_then_group():
    """Documented order [L0G0, L0G1, L1G0, L1G1, ...]: codebook k = layer * groups + group."""
    cfg = ALL["grvq"]
    q = trained(cfg)
    z = torch.randn(1, 16, 25)
    codes = q.encode(z)
    _, lib_indices, _ = q.impl(z.transpose(1, 2))  # library layout [groups, B, T, layers]
    for layer in range(cfg.num_quantizers):
        for group in range(cfg.groups):
            assert torch.equal(codes[0, layer * cfg.groups + group], lib_indices[group, 0, :, layer])
    # group g's latent slice is reconstructed from its own codebooks only
    half = q.decode(codes)[:, :8]
    group0_only = codes.clone()
    group0_only[:, 1::2] = 0  # change group 1's codes: group 0's half must not move
    torch.testing.assert_close(q.decode(group0_only)[:, :8], half, atol=0, rtol=0)


def test_truncation_keeps_whole_residual_layers():
    q = trained(ALL["grvq"])
    assert q.allowed_num_codebooks() == [2, 4, 6]
    z = torch.randn(1, 16, 10)
    codes = q.encode(z)
    assert torch.equal(q.encode(z, n_q=4), codes[:, :4])
    errors = [(q.decode(codes[:, :n]) - z).pow(2).mean() for n in (2, 4, 6)]
    assert errors[0] >= errors[1] >= errors[2]  # more residual layers: closer to the latent
    with pytest.raises(ValueError):
        q.decode(codes[:, :3])
    assert trained(ALL["fsq"]).allowed_num_codebooks() == [1]
    assert trained(ALL["rvq"]).allowed_num_codebooks() == [1, 2, 3, 4]


def test_quantizer_dropout_marks_skipped_layers():
    torch.manual_seed(3)
    q = Quantizer(16, ALL["rvq"]).train()
    depths = set()
    for _ in range(30):
        codes = q(torch.randn(2, 16, 8)).codes
        used = (codes[0, :, 0] >= 0).sum().item()
        assert torch.all(codes[:, used:] == -1) and torch.all(codes[:, :used] >= 0)
        depths.add(used)
    assert len(depths) > 1  # random depth per batch


@pytest.mark.parametrize("spec,expected_bps", [("grvq_4cb:tiny", 4 * 10 * 50), ("rvq_8cb:tiny", 8 * 10 * 50),
                                               ("fsq:tiny", 4 * math.log2(1000) * 50)])
def test_bitrate_is_sum_of_log2_cardinalities_times_frame_rate(spec, expected_bps):
    codec = load_codec(spec)
    assert codec.frame_rate == 50.0
    assert codec.bitrate == pytest.approx(expected_bps)
    n = codec.allowed_num_codebooks()[0]
    codec.set_num_codebooks(n)
    assert codec.bitrate == pytest.approx(sum(math.log2(c) for c in codec.cardinality[:n]) * 50)
    assert codec.encode(torch.zeros(1, 1, 3200)).shape[1] == n


def test_usage_metrics_on_a_known_distribution():
    # codebook 0: 4 of 8 entries used uniformly -> usage 0.5, perplexity 4; codebook 1: one entry -> perplexity 1
    codes = torch.tensor([[[0, 1, 2, 3, 0, 1, 2, 3], [5, 5, 5, 5, 5, 5, 5, 5]]])
    m = codebook_metrics(codes, [8, 8])
    assert m["codebook0/usage"].item() == pytest.approx(0.5)
    assert m["codebook0/dead"].item() == pytest.approx(0.5)
    assert m["codebook0/perplexity"].item() == pytest.approx(4.0)
    assert m["codebook1/usage"].item() == pytest.approx(1 / 8)
    assert m["codebook1/perplexity"].item() == pytest.approx(1.0)
    # skewed: p = (0.5, 0.25, 0.25) -> perplexity 2^1.5
    assert usage_from_histogram(torch.tensor([2.0, 1.0, 1.0, 0.0]))["perplexity"].item() == pytest.approx(2 ** 1.5)
    # the accumulator gives the same numbers over split batches, and ignores dropped (-1) codes
    acc = CodebookUsage([8, 8])
    acc.update(codes[..., :3])
    acc.update(torch.cat([codes[..., 3:], torch.full((1, 2, 2), -1)], dim=-1))
    assert {k: v.item() for k, v in acc.compute().items()} == pytest.approx({k: v.item() for k, v in m.items()})


def test_bad_quantizer_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="kind"):
        from_dict(QuantizerConfig, {"kind": "pq"}, "model.quantizer")
    with pytest.raises(ConfigError, match="model.quantizer.codebooksize"):
        from_dict(QuantizerConfig, {"codebooksize": 3}, "model.quantizer")
    with pytest.raises(ConfigError, match="decorrelation_weight applies to fsq and lfq"):
        from_dict(QuantizerConfig, {"kind": "rvq", "decorrelation_weight": 1.0}, "model.quantizer")
    with pytest.raises(ConfigError, match="decorrelation_weight must be >= 0"):
        from_dict(QuantizerConfig, {"kind": "lfq", "decorrelation_weight": -1.0}, "model.quantizer")
    with pytest.raises(ConfigError, match="code_balance_weight applies to lfq only"):
        from_dict(QuantizerConfig, {"kind": "fsq", "code_balance_weight": 1.0}, "model.quantizer")
    with pytest.raises(ConfigError, match="code_balance_decay must be in"):
        from_dict(QuantizerConfig, {"kind": "lfq", "code_balance_decay": 1.0}, "model.quantizer")
    with pytest.raises(ConfigError, match="balanced_thresholds applies to lfq only"):
        from_dict(QuantizerConfig, {"kind": "fsq", "balanced_thresholds": True}, "model.quantizer")


def test_decorrelation_loss_is_small_for_independent_centred_axes_and_large_otherwise():
    g = torch.Generator().manual_seed(0)
    independent = torch.randn(4096, 13, generator=g)
    assert decorrelation_loss(independent) < 0.01
    shared = torch.randn(4096, 1, generator=g)
    correlated = shared + 0.3 * torch.randn(4096, 13, generator=g)  # one direction dominates every axis
    assert decorrelation_loss(correlated) > 0.5
    offset = independent + 2.0  # uncorrelated but every axis has the same sign almost always
    assert decorrelation_loss(offset) > 0.5
    assert decorrelation_loss(independent * 1000) == pytest.approx(float(decorrelation_loss(independent)), rel=1e-4)


def test_decorrelation_term_spreads_lfq_codes_over_the_whole_codebook():
    """What the term is for: latents that vary along few directions fill few of the 2^13 LFQ entries.
    Training only the quantizer's own input projection (a Linear) against the term, on batches of 256
    frames, spreads the same 8192 frames over about as many entries as uniform random codes would reach
    (1 - 1/e = 63%); untrained, the projection leaves them in about a quarter of that."""
    g = torch.Generator().manual_seed(0)
    # 64-d latents with a steep spectrum (variance 1e2 down to 1e-6 over 64 directions) and an offset.
    basis = torch.linalg.qr(torch.randn(64, 64, generator=g))[0]
    latents = ((torch.randn(8192, 64, generator=g) * torch.logspace(1, -3, 64)) @ basis.t() + 0.5).t().unsqueeze(0)
    torch.manual_seed(0)
    q = Quantizer(64, QuantizerConfig(kind="lfq", codebook_size=8192, entropy_loss_weight=0.0, decorrelation_weight=1.0))

    def usage() -> float:
        with torch.no_grad():
            return q.eval()(latents).codes.unique().numel() / 8192

    before = usage()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(100):
        out = q.train()(latents[..., torch.randint(0, 8192, (256,), generator=g)])
        assert float(out.loss) == pytest.approx(float(out.metrics["decorrelation"]))  # weight 1, entropy term off
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = usage()
    assert before < 0.35, before
    assert after > 0.55, after


def test_code_balance_tracks_chosen_entries_and_is_zero_and_flat_at_a_uniform_window():
    codebook = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])  # LFQ's 2-bit entries
    balance = CodeBalance(codebook, decay=0.9)
    values = torch.randn(64, 2, requires_grad=True)
    loss = balance(values, torch.arange(64) % 4)  # a batch over every entry equally keeps the window uniform
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, values)
    assert grad.abs().max() < 1e-6  # nothing to gain where every entry has been equally frequent
    # After entry 3 was chosen for a whole batch, the window holds it and the term pulls frames away from it.
    balance(values.detach(), torch.full((64,), 3))
    assert balance.frequency.tolist() == pytest.approx([0.225, 0.225, 0.225, 0.325])
    near_entry_3 = (0.5 + 0.3 * torch.randn(64, 2)).requires_grad_()
    loss = balance(near_entry_3, torch.full((64,), 3))
    (grad,) = torch.autograd.grad(loss, near_entry_3)
    assert (grad > 0).all()  # descending the loss lowers both axes: away from entry 3 (bits 1, 1)


def test_code_balance_flattens_the_code_distribution_over_its_window():
    """Frames that start piled on a few of 16 entries (4 bits, each skewed 90/10) end up spread almost
    uniformly when their values descend the term alone: the window shows which entries were over-used."""
    g = torch.Generator().manual_seed(0)
    bits = 4
    entries = torch.tensor([[1.0 if (e >> (bits - 1 - b)) & 1 else -1.0 for b in range(bits)] for e in range(2 ** bits)])
    balance = CodeBalance(entries, decay=0.9)
    values = (torch.randn(512, bits, generator=g) + 1.3).requires_grad_()  # P(bit = 1) = 0.9 for each bit
    weights = 2 ** torch.arange(bits - 1, -1, -1)

    def code_entropy_bits() -> float:
        p = torch.bincount(((values.detach() > 0).long() * weights).sum(1), minlength=2 ** bits).float() / 512
        return float(-(p[p > 0] * p[p > 0].log2()).sum())

    before = code_entropy_bits()
    opt = torch.optim.SGD([values], lr=100.0)  # the loss is a mean over 512 frames
    for _ in range(100):
        loss = balance(values, ((values.detach() > 0).long() * weights).sum(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before < 2.5, before
    assert code_entropy_bits() > 3.8  # of 4


def _code_balance_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        codebook = torch.tensor([[-1.0], [1.0]])  # a 1-bit LFQ
        balance = CodeBalance(codebook, decay=0.5)
        balance(torch.randn(8, 1), torch.full((8,), rank))  # rank 0 chose entry 0 only, rank 1 entry 1 only
        torch.save(balance.frequency, f"{out_dir}/frequency{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_code_balance_window_is_the_same_on_every_ddp_rank(tmp_path):
    """Under DDP the window counts the codes of all ranks (an all-reduce), so no rank's gradient chases a
    distribution only it has seen."""
    torch.multiprocessing.spawn(_code_balance_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    first, second = (torch.load(tmp_path / f"frequency{r}.pt") for r in (0, 1))
    assert first.tolist() == second.tolist() == pytest.approx([0.5, 0.5])  # uniform start, both entries equally chosen


def dependent_axes(n: int, seed: int) -> torch.Tensor:
    """13 axes whose signs are far from independent and uniform: axis 1 follows axis 0's sign, and cubing
    piles the frames near the origin, off centre."""
    x = torch.randn(n, 13, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 1] += 3 * x[:, 0].sign()
    return (x + 0.3) ** 3


def test_balanced_thresholds_spread_the_fitted_frames_evenly_and_new_frames_nearly_so():
    train = dependent_axes(12 * 8192, seed=0)
    thresholds = fit_balanced_thresholds(train)
    assert thresholds.shape == (8191,)
    # Every prefix's frames are split at their median: exactly 12 frames per entry.
    assert torch.bincount(lfq_entries(train, thresholds), minlength=8192).unique().tolist() == [12]
    # All-zero thresholds are the plain signs.
    assert torch.equal(lfq_entries(train, torch.zeros(8191, dtype=train.dtype)), lfq_entries(train))
    # New frames from the same distribution, 4.6 per entry (the held-out speaker's ratio): uniform codes would use
    # 99.0% of the entries; the plain signs use far fewer.
    test = dependent_axes(37851, seed=1)
    usage = lambda ids: float(torch.bincount(ids, minlength=8192).gt(0).double().mean())  # noqa: E731
    assert usage(lfq_entries(test, thresholds)) > 0.96
    assert usage(lfq_entries(test)) < 0.75  # 67%: bits biased by the offset and tied by axis 1


def test_lfq_with_fitted_thresholds_encodes_decodes_and_trains_on_the_same_codes():
    torch.manual_seed(0)
    q = Quantizer(16, QuantizerConfig(kind="lfq", codebook_size=8192, balanced_thresholds=True)).eval()
    z = torch.randn(3, 16, 400) * torch.linspace(0.1, 3, 16)[:, None]
    plain = lfq_entries(q.impl.project_in(z.transpose(1, 2))).unsqueeze(1)
    assert torch.equal(q.encode(z), plain) and torch.equal(q(z).codes, plain)  # not fitted: the library's signs
    q.fit_thresholds(z.transpose(1, 2).reshape(-1, 16))
    assert bool(q.thresholds_fitted) and "thresholds" in q.state_dict()
    codes = q.encode(z)
    assert not torch.equal(codes, plain)
    assert len(codes.unique()) > 0.85 * 1200  # 1,200 frames over 8192 entries: nearly all distinct
    for training in (False, True):
        out = q.train(training)(z.requires_grad_(True))
        assert torch.equal(out.codes, codes) and float(out.loss) == 0.0
    assert torch.allclose(q.eval()(z).z_q, q.decode(codes), atol=1e-6)  # decode rebuilds what forward gives
    z.grad = None
    q(z).z_q.square().sum().backward()  # straight-through: the gradient reaches the latent
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="balanced_thresholds"):
        Quantizer(16, QuantizerConfig(kind="lfq", codebook_size=8192)).fit_thresholds(z.detach()[0].t())
