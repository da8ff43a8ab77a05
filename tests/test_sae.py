import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.features import stream
from pipeline.method import sae
from pipeline.method.sae import TopKSAE


def chunked(tokens: np.ndarray, chunk: int):
    """A read(chunk) closure and chunk count over an in-memory (N, L, d) array, as a store gives."""
    return (lambda c: tokens[c * chunk : (c + 1) * chunk]), -(-len(tokens) // chunk)


def planted(n_atoms=48, d=24, k_true=3, n=16384, seed=0):
    """Tokens that are sparse non-negative combinations of a known unit-norm dictionary."""
    g = np.random.default_rng(seed)
    atoms = g.standard_normal((n_atoms, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    idx = np.stack([g.choice(n_atoms, k_true, replace=False) for _ in range(n)])
    coef = g.uniform(0.5, 2.0, (n, k_true))
    x = np.einsum("nk,nkd->nd", coef, atoms[idx])
    return atoms, x.astype(np.float16).reshape(-1, 16, d)


TRAIN = dict(tokens_per_image=16, batch_images=16, betas=(0.5, 0.999), k_aux=32, auxk_coef=1 / 32,
             dead_tokens=20_000, buffer_tokens=8192)


def test_codes_have_at_most_k_nonnegative_entries():
    torch.manual_seed(0)
    model = TopKSAE(16, 64, 5, generator=torch.Generator().manual_seed(0))
    x = torch.randn(200, 16)
    with torch.no_grad():
        z = model.dense_codes(x)
        pre = F.relu(x @ model.encoder.T)
    assert ((z != 0).sum(dim=1) <= 5).all() and (z >= 0).all()
    # the selected entries are the k largest ReLU pre-activations
    np.testing.assert_allclose(z.sort(dim=1).values[:, -5:], pre.sort(dim=1).values[:, -5:], rtol=1e-6)


def test_sparse_decode_equals_dense_product():
    model = TopKSAE(16, 64, 5, generator=torch.Generator().manual_seed(1))
    x = torch.randn(50, 16)
    values, indices = model.encode(x)
    dense = model.dense_codes(x) @ model.dictionary
    torch.testing.assert_close(model.decode(values, indices), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [3, 40])  # below and above the density at which decode goes dense
def test_decode_rows_gives_the_same_value_and_gradients_sparse_or_dense(k, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    dictionary = torch.randn(64, 16, generator=gen, requires_grad=True)
    values = torch.rand(30, k, generator=gen, requires_grad=True)
    indices = torch.stack([torch.randperm(64, generator=gen)[:k] for _ in range(30)])
    upstream = torch.randn(30, 16, generator=gen)
    # slow reference: the sum over each row's k atoms, one by one
    reference = torch.stack([sum(values[b, j] * dictionary[indices[b, j]] for j in range(k)) for b in range(30)])
    ref_grads = torch.autograd.grad((reference * upstream).sum(), [values, dictionary])
    for density in (0.0, 2.0):  # 0: always dense; 2: always sparse
        monkeypatch.setattr(sae, "DENSE_DECODE_DENSITY", density)
        out = sae.decode_rows(values, indices, dictionary)
        grads = torch.autograd.grad((out * upstream).sum(), [values, dictionary])
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_tied_init_and_unit_rows():
    model = TopKSAE(8, 32, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.encoder, model.dictionary)
    torch.testing.assert_close(model.dictionary.norm(dim=1), torch.ones(32))
    assert not model.bias.requires_grad and not model.bias.any()


def test_rows_stay_unit_norm_and_parallel_gradient_is_removed():
    _, tokens = planted(n=512)
    read, n = chunked(tokens, 8)
    model = TopKSAE(24, 64, 3, generator=torch.Generator().manual_seed(0))
    sae.train(model, read, n, epochs=1, lr=1e-2, seed=0, **TRAIN)
    torch.testing.assert_close(model.dictionary.norm(dim=1), torch.ones(64))
    x = torch.from_numpy(tokens[:4].astype(np.float32).reshape(-1, 24))
    recon, *_ = model(x)
    sae.fvu(x, recon).backward()
    model.remove_parallel_grad_()
    parallel = (model.dictionary.grad * model.dictionary).sum(dim=1)
    assert parallel.abs().max() < 1e-6


def _one_step_by_hand(model, x, lr, betas, project):
    """The step ``sae.train`` takes on batch x (B, d) with no dead latent: FVU, backward, (projection of
    each dictionary row's gradient onto the row's orthogonal complement), Adam, renormalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    recon, *_ = model(x)
    sae.fvu(x, recon).backward()
    if project:  # written out here, not model.remove_parallel_grad_(), so a broken method fails too
        with torch.no_grad():
            d = model.dictionary / model.dictionary.norm(dim=1, keepdim=True)
            model.dictionary.grad -= (model.dictionary.grad * d).sum(dim=1, keepdim=True) * d
    opt.step()
    model.unit_norm_dictionary_()
    return model.dictionary.detach()


def test_train_removes_the_parallel_gradient_before_each_adam_step():
    # One image of 2 tokens = one batch, one step. With 2 rows every per-element gradient sum has two
    # terms, so the order train's shuffle puts them in cannot change the result.
    g = np.random.default_rng(4)
    tokens = g.uniform(0.2, 1.0, (1, 2, 8)).astype(np.float16)
    read, n = chunked(tokens, 1)
    kw = dict(TRAIN, tokens_per_image=2, batch_images=1, dead_tokens=10**9, buffer_tokens=64)
    init = TopKSAE(8, 16, 3, generator=torch.Generator().manual_seed(5)).state_dict()
    trained = TopKSAE(8, 16, 3)
    trained.load_state_dict(init)
    sae.train(trained, read, n, epochs=1, lr=1e-2, seed=0, **kw)
    x = torch.from_numpy(tokens[0].astype(np.float32))
    expected, unprojected = [], []
    for project, out in ((True, expected), (False, unprojected)):
        model = TopKSAE(8, 16, 3)
        model.load_state_dict(init)
        out.append(_one_step_by_hand(model, x, 1e-2, kw["betas"], project))
    # the projection matters: without it Adam's first step (≈ lr · sign(g)) lands elsewhere
    assert (expected[0] - unprojected[0]).abs().max() > 1e-3
    torch.testing.assert_close(trained.dictionary.detach(), expected[0], rtol=0, atol=1e-6)


def test_auxk_is_zero_without_dead_latents_and_positive_with_some():
    model = TopKSAE(16, 64, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, 16)
    recon, _, _, pre = model(x)
    residual = (x - recon).detach()
    none = torch.zeros(64, dtype=torch.bool)
    assert sae.auxk_loss(model, pre, residual, none, 8).item() == 0.0
    some = torch.zeros(64, dtype=torch.bool)
    some[:40] = True
    loss = sae.auxk_loss(model, pre, residual, some, 8)
    assert loss.item() > 0
    loss.backward()
    # only dead latents receive a gradient through the AuxK path
    assert model.dictionary.grad[40:].abs().sum() == 0 and model.dictionary.grad[:40].abs().sum() > 0


def _four_live_four_never_fire(seed=0):
    """TopKSAE(4, 8, k=4) on positive tokens: latents 0-3 (encoder rows e_j) always win the top 4,
    latents 4-7 (encoder rows 0.02 · 1) have positive pre-activations (so AuxK can use them) that are
    always smaller, so they never fire."""
    model = TopKSAE(4, 8, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.encoder.copy_(torch.cat([torch.eye(4), 0.02 * torch.ones(4, 4)]))
    return model


def test_latent_is_declared_dead_after_dead_tokens_and_auxk_switches_on_then():
    g = np.random.default_rng(0)
    tokens = g.uniform(0.5, 1.5, (10, 4, 4)).astype(np.float16)  # 40 tokens: 5 steps of 8 per epoch
    read, n = chunked(tokens, 2)
    kw = dict(TRAIN, tokens_per_image=4, batch_images=2, buffer_tokens=1024, k_aux=4)
    # dead_tokens 24 = 3 batches: after step 3 the never-firing latents have gone 24 tokens unfired
    model = _four_live_four_never_fire()
    stats = sae.train(model, read, n, epochs=1, lr=1e-3, seed=0, log_every=1, **{**kw, "dead_tokens": 24})
    assert [row["step"] for row in stats.curve] == [1, 2, 3, 4, 5]
    assert [row["dead"] for row in stats.curve] == [0.0, 0.0, 0.5, 0.5, 0.5]
    assert [row["auxk"] for row in stats.curve[:2]] == [0.0, 0.0]
    assert all(row["auxk"] > 0.1 for row in stats.curve[2:])
    # AuxK trains the dead latents' dictionary rows; with nothing ever dead they never move
    never = _four_live_four_never_fire()
    before = never.dictionary.detach().clone()
    stats = sae.train(never, read, n, epochs=1, lr=1e-3, seed=0, log_every=1, **{**kw, "dead_tokens": 10**9})
    assert all(row["auxk"] == 0.0 and row["dead"] == 0.0 for row in stats.curve)
    assert torch.equal(never.dictionary[4:].detach(), before[4:])
    assert not torch.allclose(model.dictionary[4:].detach(), before[4:], atol=1e-4)


def test_fvu_hand_worked():
    target = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0); total variance 1 + 1 = 2
    recon = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # squared error 1
    assert sae.fvu(target, recon).item() == pytest.approx(0.5)


def test_planted_dictionary_is_recovered():
    atoms, tokens = planted()
    read, n = chunked(tokens, 64)
    model = TopKSAE(24, 96, 3, generator=torch.Generator().manual_seed(0))
    sae.train(model, read, n, epochs=5, lr=3e-3, seed=0, **TRAIN)
    final_fvu, _ = sae.evaluate(model, read, n)
    cos = atoms @ model.dictionary.detach().numpy().T
    assert (cos.max(axis=1) > 0.9).mean() >= 0.9
    assert final_fvu < 0.2


def test_same_seed_same_weights():
    _, tokens = planted(n=1024)
    read, n = chunked(tokens, 8)
    runs = []
    for _ in range(2):
        model = TopKSAE(24, 64, 3, generator=torch.Generator().manual_seed(3))
        sae.train(model, read, n, epochs=2, lr=1e-3, seed=3, **TRAIN)
        runs.append(model.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_one_epoch_yields_every_token_exactly_once():
    n_images, length, d = 37, 5, 3
    ids = np.arange(n_images * length, dtype=np.float16).reshape(n_images, length, 1)
    tokens = np.concatenate([ids, np.zeros((n_images, length, d - 1), np.float16)], axis=2)
    read, n = chunked(tokens, 4)
    batches = list(stream.token_batches(read, n, batch_tokens=12, buffer_tokens=16, rng=np.random.default_rng(0)))
    seen = np.concatenate([b[:, 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(n_images * length))
    assert all(len(b) == 12 for b in batches[:-1]) and 0 < len(batches[-1]) <= 12
    assert not np.array_equal(seen, np.sort(seen))  # shuffled, not in store order


def test_non_finite_tokens_name_the_chunk():
    tokens = np.zeros((8, 2, 3), np.float16)
    tokens[5, 1, 2] = np.inf
    read, n = chunked(tokens, 2)
    with pytest.raises(FloatingPointError, match="chunk 2"):
        list(stream.token_batches(read, n, 4, 8, np.random.default_rng(0)))


def test_dead_mask_marks_latents_that_never_fire():
    model = TopKSAE(4, 8, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # latent j is the j-th basis direction (j < 4), the rest point away from data
        model.encoder.copy_(torch.cat([torch.eye(4), -torch.ones(4, 4)]))
        model.dictionary.copy_(model.encoder / model.encoder.norm(dim=1, keepdim=True))
    tokens = np.zeros((4, 1, 4), np.float16)
    tokens[:, 0, :3] = np.eye(4, dtype=np.float16)[:, :3] * 2 + 0.1 * np.eye(4, dtype=np.float16)[:, :3]
    tokens[3, 0] = [0, 1, 0, 0]
    read, n = chunked(tokens, 2)
    _, dead = sae.evaluate(model, read, n)
    assert dead.tolist() == [False, False, False, True, True, True, True, True]


def test_save_load_round_trip_is_exact(tmp_path):
    model = TopKSAE(8, 32, 4, decoder_bias=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.encoder.add_(0.1)
        model.bias.fill_(0.5)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[3] = True
    sae.save(model, tmp_path / "sae", dead, extra={"features": {"backbone": "b"}})
    loaded, loaded_dead, config = sae.load(tmp_path / "sae")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded_dead, dead) and config["k"] == 4 and config["features"]["backbone"] == "b"
    x = torch.randn(5, 8)
    assert torch.equal(loaded(x)[0], model(x)[0])


class BoundedRng:
    """A numpy Generator that refuses more than ``limit`` permutations: token_batches shuffles on every
    turn of its loop, so a loop that stops advancing (without yielding) raises instead of hanging."""

    def __init__(self, seed: int, limit: int) -> None:
        self.rng, self.left = np.random.default_rng(seed), limit

    def permutation(self, n):
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("token_batches does not advance: permutation limit reached")
        return self.rng.permutation(n)


@pytest.mark.parametrize("buffer_tokens", [1, 2, 3, 5, 7, 11, 12, 13, 20, 21, 40, 41, 200])
def test_token_batches_terminate_and_yield_every_token_once_for_any_buffer(buffer_tokens):
    """Buffers of 1, 2, 3 rows, odd sizes, below and above the batch (12) and the chunk (4 images x 5
    tokens = 20 rows). Both the stream and the shuffles are bounded well above what an epoch needs, so
    a loop that stops advancing fails the test instead of hanging it."""

    n_images, length, batch = 37, 5, 12
    tokens = np.arange(n_images * length, dtype=np.float16).reshape(n_images, length, 1)
    read, n = chunked(tokens, 4)
    expected = -(-n_images * length // batch)  # 16 batches: 15 of 12 tokens and one of 5
    produced = stream.token_batches(read, n, batch_tokens=batch, buffer_tokens=buffer_tokens,
                                    rng=BoundedRng(0, limit=10_000))
    batches = list(itertools.islice(produced, 10 * expected))
    assert len(batches) == expected
    assert [len(b) for b in batches] == [batch] * (expected - 1) + [n_images * length - batch * (expected - 1)]
    seen = np.concatenate([b[:, 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(n_images * length))


# ----------------------------------------------------------------------------------------------------
# Devices. ``meta`` stands in for a second device on CPU-only machines: see tests/devices.py.


def test_a_model_cast_to_bf16_still_saves_a_float32_checkpoint(tmp_path):
    """The checkpoint format is fp32 safetensors: a model cast to bf16 for speed must not leak its
    dtype into sae.safetensors (the values are the bf16 ones, widened exactly)."""
    from safetensors.torch import load_file

    model = TopKSAE(8, 16, 2, decoder_bias=True, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    sae.save(model, tmp_path, torch.zeros(16, dtype=torch.bool))
    saved = load_file(str(tmp_path / "sae.safetensors"))
    assert {k: v.dtype for k, v in saved.items()} == {"dictionary": torch.float32, "encoder": torch.float32,
                                                     "bias": torch.float32, "dead_mask": torch.bool}
    assert torch.equal(saved["dictionary"], model.dictionary.detach().float())


def test_evaluate_moves_the_model_to_the_device_it_is_asked_for():
    """sae.evaluate(device=D) on a model left on another device combined the model's weights with
    tokens and counters on D ("Tensor on device meta is not on the expected device cpu!" here, the
    same error as CPU weights with CUDA tokens). Now the model is moved to D first, as train does.
    On meta the pass then stops at the first scalar read (meta tensors hold no values), which is
    past every point where two devices could meet."""
    from tests.devices import assert_on

    tokens = np.random.default_rng(0).standard_normal((4, 16, 8)).astype(np.float16)
    read, n_chunks = chunked(tokens, 2)
    model = TopKSAE(8, 16, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises((RuntimeError, NotImplementedError)) as err:
        sae.evaluate(model, read, n_chunks, device=torch.device("meta"))
    assert "expected device" not in str(err.value)
    assert_on(model, "meta")


def test_save_refuses_non_finite_weights_and_keeps_the_previous_checkpoint(tmp_path):
    good = sae.TopKSAE(6, 8, 2, generator=torch.Generator().manual_seed(0))
    sae.save(good, tmp_path / "s", torch.zeros(8, dtype=torch.bool))
    before = (tmp_path / "s" / "sae.safetensors").read_bytes()
    bad = sae.TopKSAE(6, 8, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bad.encoder[0, 0] = float("inf")
    with pytest.raises(sae.SAEError, match="NaN/Inf weights"):
        sae.save(bad, tmp_path / "s", torch.zeros(8, dtype=torch.bool))
    assert (tmp_path / "s" / "sae.safetensors").read_bytes() == before
