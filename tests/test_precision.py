"""Training precision and host syncs: bfloat16 autocast in train_sae and fit_guides (float32 master
weights), and the SAE steps that read nothing back on the host (what a GPU's queue needs)."""

import os
import sys

import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.method import guides, sae
from pipeline.method.sae import TopKSAE
from tests.test_guides import planted as planted_guides
from tests.test_sae import TRAIN, chunked, planted

BF16_UNIT = 2.0**-8
"""Spacing of bfloat16 numbers in [1, 2) (8 significand bits): a rounding moves a value by at most half of it, relative."""


def to_bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float64)


def test_bf16_autocast_pre_activations_are_the_rounded_product_of_rounded_inputs():
    # autocast casts the matmul's inputs to bfloat16, accumulates in float32 and rounds the output to
    # bfloat16: the reference does the same casts and an exact (float64) product
    g = torch.Generator().manual_seed(0)
    d, n = 64, 256
    model = TopKSAE(d, n, 8, decoder_bias=True, generator=g)
    with torch.no_grad():
        model.bias.copy_(0.1 * torch.randn(d, generator=g))
    x = torch.randn(128, d, generator=g)
    with sae.autocast(torch.device("cpu"), torch.bfloat16):
        pre = model.pre_acts(x)
    assert pre.dtype == torch.bfloat16
    a, w = to_bf16(x - model.bias.detach()), to_bf16(model.encoder.detach())
    exact = torch.relu(a @ w.T)
    magnitude = a.abs() @ w.abs().T
    # half a bf16 unit of the output's rounding, doubled for the output's own binade, plus float32
    # accumulation over d terms (d * 2^-24 of the sum of magnitudes)
    bound = BF16_UNIT * exact + d * 2.0**-24 * magnitude
    assert (pre.double() - exact).abs().le(bound + 1e-30).all()
    # and bf16 is really in play: float32 pre-activations differ from these
    assert not torch.equal(pre.float(), model.pre_acts(x).detach())


def test_bf16_training_keeps_float32_weights_and_lands_within_the_seed_spread(tmp_path):
    _, tokens = planted(n=2048)
    read, n = chunked(tokens, 16)
    fvus = {}
    for seed in (0, 1, 2):
        model = TopKSAE(24, 96, 3, generator=torch.Generator().manual_seed(seed))
        sae.train(model, read, n, epochs=3, lr=3e-3, seed=seed, **TRAIN)
        fvus[seed] = sae.evaluate(model, read, n)[0]
        if seed == 0:
            fp32 = model
    bf16 = TopKSAE(24, 96, 3, generator=torch.Generator().manual_seed(0))
    sae.train(bf16, read, n, epochs=3, lr=3e-3, seed=0, dtype=torch.bfloat16, **TRAIN)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert not torch.equal(bf16.dictionary, fp32.dictionary)  # the autocast changed the arithmetic
    # the tolerance is measured, not chosen: precision may move the result no more than the seed does
    spread = max(abs(fvus[s] - fvus[0]) for s in (1, 2))
    assert spread > 0
    assert abs(sae.evaluate(bf16, read, n)[0] - fvus[0]) <= spread
    sae.save(bf16, tmp_path, torch.zeros(96, dtype=torch.bool))
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "sae.safetensors"))["dictionary"].dtype == torch.float32


def _dying_setup():
    """Positive tokens where latents 4-7 never fire, so AuxK switches on after 24 tokens, with fewer
    dead latents (4) than k_aux (6) and the AuxK codes dense (6 of 8 latents)."""
    g = np.random.default_rng(0)
    tokens = g.uniform(0.5, 1.5, (40, 4, 4)).astype(np.float16)
    model = TopKSAE(4, 8, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.encoder.copy_(torch.cat([torch.eye(4), 0.02 * torch.ones(4, 4)]))
    kw = dict(TRAIN, tokens_per_image=4, batch_images=2, buffer_tokens=1024, k_aux=6, dead_tokens=24)
    return tokens, model, kw


def test_the_sync_free_step_trains_the_same_bits_as_the_default_one():
    assert 6 / 8 >= sae.DENSE_DECODE_DENSITY
    runs = []
    for sync_free in (False, True):
        tokens, model, kw = _dying_setup()
        read, n = chunked(tokens, 4)
        stats = sae.train(model, read, n, epochs=2, lr=1e-3, seed=0, log_every=1, sync_free=sync_free, **kw)
        runs.append((model.state_dict(), stats.curve))
    (a, curve_a), (b, curve_b) = runs
    assert any(row["auxk"] > 0 for row in curve_a) and curve_a[0]["auxk"] == 0.0  # both AuxK branches ran
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert curve_a == curve_b


def test_the_static_auxk_path_equals_the_branching_one_with_and_without_dead_latents():
    g = torch.Generator().manual_seed(1)
    model = TopKSAE(16, 64, 4, generator=g)
    x = torch.randn(32, 16, generator=g)
    recon, _, _, pre = model(x)
    residual = (x - recon).detach()
    k_aux = 16  # 16 / 64 >= the dense threshold
    for n_dead in (0, 3, 7, 40):
        dead = torch.zeros(64, dtype=torch.bool)
        dead[:n_dead] = True
        want = sae.auxk_loss(model, pre, residual, dead, k_aux)
        got = sae.auxk_loss(model, pre, residual, dead, k_aux, sync_free=True)
        if n_dead == 3:
            # the default path decodes its 3 codes sparsely (3 / 64 is under the threshold), the static
            # one its 16 densely: the same sum, rounded in another order (float32: a few units of 2^-24)
            assert min(k_aux, n_dead) < sae.DENSE_DECODE_DENSITY * 64
            torch.testing.assert_close(got, want, rtol=8 * 2.0**-24, atol=0)
            continue
        assert torch.equal(got, want), n_dead  # both dense (or both zero): the same codes, the same bits
        if n_dead:
            gw = torch.autograd.grad(want, model.dictionary, retain_graph=True)[0]
            gg = torch.autograd.grad(got, model.dictionary, retain_graph=True)[0]
            assert torch.equal(gw, gg)


def test_fired_latents_is_boolean_indexing_without_it():
    g = torch.Generator().manual_seed(2)
    values = torch.relu(torch.randn(50, 5, generator=g))
    indices = torch.stack([torch.randperm(30, generator=g)[:5] for _ in range(50)])
    want = torch.zeros(30, dtype=torch.bool)
    want[indices[values > 0]] = True
    assert torch.equal(sae.fired_latents(values, indices, 30), want)


class HostReads:
    """Counts tensor-to-host conversions (.item(), .tolist(), float(), int(), bool()) made outside
    torch.optim while active. Adam (not capturable, the default) keeps its step counter on the host
    whatever the parameters' device, so its .item() of it is no device sync."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *args, _original=original, **kw):
                caller = sys._getframe(1).f_code.co_filename
                if f"torch{os.sep}optim{os.sep}" not in caller:
                    self.count += 1
                return _original(t, *args, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("sync_free", [True, False])
def test_sync_free_host_reads_do_not_grow_with_the_steps(monkeypatch, sync_free):
    reads = {}
    for images in (20, 40):  # 10 and 20 steps of one epoch, one curve row at the end
        tokens, model, kw = _dying_setup()
        read, n = chunked(tokens[:images], 4)
        counter = HostReads(monkeypatch)
        sae.train(model, read, n, epochs=1, lr=1e-3, seed=0, log_every=10**6, sync_free=sync_free, **kw)
        reads[images] = counter.count
        monkeypatch.undo()
    if sync_free:
        assert reads[20] == reads[40] <= 2  # the one curve row: its sums and its dead fraction
    else:  # the default path reads the dead count every step (free on a CPU): the check can fail
        assert reads[40] - reads[20] >= 10


def test_bf16_guides_keep_float32_codes_and_find_the_planted_atom():
    dictionary, read, n_chunks, _ = planted_guides()
    kw = dict(lr=1e-2, epochs=30, ema_decay=0.9, seed=0)
    fp32 = guides.fit(read, n_chunks, dictionary, None, (4, 4), **kw)
    bf16 = guides.fit(read, n_chunks, dictionary, None, (4, 4), dtype=torch.bfloat16, **kw)
    assert bf16.codes.dtype == torch.float32
    assert not torch.equal(bf16.codes, fp32.codes)
    assert int(bf16.codes[guides.ANOMALY_LOCAL].argmax()) == 20


def test_precision_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sae.autocast_dtype("auto", cuda) is torch.bfloat16
    assert sae.autocast_dtype("auto", cpu) is None
    assert sae.autocast_dtype("float32", cuda) is None
    assert sae.autocast_dtype("bfloat16", cpu) is torch.bfloat16
    for section in (config.SAEConfig, config.GuidesConfig):
        with pytest.raises(config.ConfigError, match="precision: 'fp16' is not one of auto, float32, bfloat16"):
            section(precision="fp16")
