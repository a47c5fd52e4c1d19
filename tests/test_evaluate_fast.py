"""Tests for FID-C's reference reduced once (metrics.group_moments, mixture_moments,
frechet_to_reference) against the direct formulas, for the one forward pass behind features and
confidence, and for the progress bars of the sampling and evaluation stages.

The direct formulas are metrics.moments (weighted by share_weights) and metrics.frechet_distance; on
random full-rank float64 data the closed form must match them to round-off (1e-12 on the moments,
1e-8 on the distance)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's flat modules without installing
import ddpm  # noqa: E402
import evaluate  # noqa: E402
import invdiff_report  # noqa: E402
import metrics  # noqa: E402
from classifiers import ConvNet, predict  # noqa: E402
from data import DataConfig, load  # noqa: E402
from idx import write_mnist  # noqa: E402  (tests/idx.py)


def features_of_groups(sizes, dim=12, seed=0):
    """float64 features [N, dim] whose group g (sizes[g] rows) has its own mean and scale."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    f = torch.cat([torch.randn(n, dim, generator=gen, dtype=torch.float64) @ mix * (1 + g) + 3 * g
                   for g, n in enumerate(sizes)])
    return f, torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])


# ------------------------------------------------------------------------- the closed form
@pytest.mark.parametrize("p", [[0.8, 0.15, 0.05], [0.0, 0.3, 0.7], [1.0, 0.0, 0.0], None])
def test_mixture_moments_equal_the_weighted_moments(p):
    f, groups = features_of_groups([700, 200, 100])
    reference = metrics.group_moments(f, groups, 3)
    weights = None if p is None else metrics.share_weights(groups, torch.tensor(p))
    mu, s = metrics.moments(f, weights)
    mu_fast, s_fast = metrics.mixture_moments(reference, p if p is None else torch.tensor(p))
    assert torch.allclose(mu_fast, mu, rtol=1e-12, atol=1e-12 * mu.abs().max())
    assert torch.allclose(s_fast, s, rtol=1e-12, atol=1e-12 * s.abs().max())


def test_an_empty_group_is_left_out_as_share_weights_leaves_it():
    """Group 2 has no member: its share goes nowhere and the other two are renormalised."""
    f, groups = features_of_groups([300, 100])
    p = torch.tensor([0.5, 0.3, 0.2])
    mu, s = metrics.moments(f, metrics.share_weights(groups, p))
    mu_fast, s_fast = metrics.mixture_moments(metrics.group_moments(f, groups, 3), p)
    assert torch.allclose(mu_fast, mu, rtol=1e-12) and torch.allclose(s_fast, s, rtol=1e-12)


@pytest.mark.parametrize("p", [[0.8, 0.2], [0.5, 0.5], [0.05, 0.95], None])
def test_frechet_to_reference_equals_the_direct_distance(p):
    f2, g2 = features_of_groups([6000, 4000], dim=40, seed=1)
    f1 = features_of_groups([900, 100], dim=40, seed=2)[0] * 1.1 + 0.2
    weights = None if p is None else metrics.share_weights(g2, torch.tensor(p))
    direct = metrics.frechet_distance(f1, f2, weights)
    fast = metrics.frechet_to_reference(f1, metrics.group_moments(f2, g2, 2), p if p is None else torch.tensor(p))
    assert fast == pytest.approx(direct, rel=1e-8)


def test_the_weights_matter():
    """The reweighted reference is not the balanced one (so the tests above can tell them apart)."""
    f2, g2 = features_of_groups([5000, 5000], dim=8)
    f1 = f2[:4000][torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:1000]]   # group 0 only
    reference = metrics.group_moments(f2, g2, 2)
    assert metrics.frechet_to_reference(f1, reference, torch.tensor([1.0, 0.0])) * 10 < \
        metrics.frechet_to_reference(f1, reference)


def test_group_moments_and_frechet_to_reference_refuse_bad_shapes():
    f, groups = features_of_groups([10, 10], dim=4)
    with pytest.raises(ValueError, match="groups in 0 … 1"):
        metrics.group_moments(f, groups + 1, 2)
    with pytest.raises(ValueError, match="groups in 0 … 1"):
        metrics.group_moments(f, groups - 1, 2)
    with pytest.raises(ValueError, match="D = 4"):
        metrics.frechet_to_reference(torch.zeros(10, 3), metrics.group_moments(f, groups, 2))
    with pytest.raises(ValueError, match="N ≥ 2"):
        metrics.frechet_to_reference(torch.zeros(1, 4), metrics.group_moments(f, groups, 2))


def test_one_thread_restores_the_thread_count_also_after_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(3)                    # not 1, so that a missing restore shows
    try:
        with metrics.one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
        with pytest.raises(RuntimeError):
            with metrics.one_thread():
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the evaluator
def bars(n, seed):
    """uint8 [n, 28, 28] images of one bar per 'digit' and the labels [n]."""
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        images[i, 3 + 2 * k:5 + 2 * k, 4:24] = 200 + (i + seed) % 50
    return images, labels


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    """cmnist with the color reader and a seeded, untrained digit CNN: real enough features, no training."""
    root = write_mnist(tmp_path_factory.mktemp("bars"), bars, 500, 600)
    cfg = DataConfig(dataset="cmnist", data_root=str(root), download="false")
    torch.manual_seed(0)
    return evaluate.Evaluator(cfg, {"digit": ConvNet(1, 10).eval()}, {}, "cpu", color_scale=3.0)


def test_evaluate_arm_matches_the_direct_fid_and_the_separate_confidence(evaluator):
    test = load(evaluator.cfg, "test")
    pool = torch.cat([test.images[test.group == 0][:120], test.images[test.group == 1][:40]])
    noise = torch.randint(0, 60, pool.shape, generator=torch.Generator().manual_seed(0))   # below the foreground
    pool = (pool.int() + noise).clamp(max=255).to(torch.uint8)          # unlike the test images: FID-C well above 0
    out = evaluate.evaluate_arm({"name": "a", "images": pool}, evaluator, evaluator.real_moments(evaluator.cfg, "test"))
    f1, (f2, g2) = evaluator.features(pool), evaluator.real_features(evaluator.cfg, "test")
    assert out["p_hat"] == [0.75, 0.25]
    direct = metrics.frechet_distance(f1, f2, metrics.share_weights(g2, torch.tensor([0.75, 0.25])))
    balanced = metrics.frechet_distance(f1, f2)
    # CNN features have dead (zero-variance) units: their covariances are singular, and the square
    # roots of eigenvalues at round-off (~1e-16) move the distance by ~1e-7 of itself between two
    # summation orders (the direct formula on permuted rows too); a wrong weight moves it by far more
    assert abs(direct - balanced) > 0.5 * direct
    assert out["FID_C"] == pytest.approx(direct, rel=1e-5)
    assert out["FID_C_vs_balanced"] == pytest.approx(balanced, rel=1e-5)
    assert out["confidence"] == evaluator.classes(pool)[1].mean().item()       # what ddm_report once computed


def test_the_reference_moments_are_those_of_a_fresh_evaluator(evaluator):
    again = evaluate.Evaluator(evaluator.cfg, evaluator.nets, {}, "cpu", color_scale=3.0)
    cached, fresh = evaluator.real_moments(evaluator.cfg, "test"), again.real_moments(again.cfg, "test")
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh))
    assert evaluator.real_moments(evaluator.cfg, "test")[0].sum() == 600


@pytest.mark.parametrize("dataset", ["cmnist", "mnist-pair", "celeba"])
def test_read_features_is_one_pass_of_the_features_and_the_confidence(dataset):
    torch.manual_seed(0)
    nets = ({"gender": ConvNet(3, 2).eval(), "attr": ConvNet(3, 2).eval()} if dataset == "celeba"
            else {"digit": ConvNet(1, 10).eval()})                                  # as get_evaluator builds them
    ev = evaluate.Evaluator(DataConfig(dataset=dataset), nets, {}, "cpu")
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    features, confidence = ev.read_features(images)
    assert torch.equal(features, ev.features(images))
    if dataset == "celeba":     # the gender CNN's softmax, as ddm_report read it before
        assert torch.equal(confidence, predict(nets["gender"], images, "cpu")[0].max(1).values)
    else:
        assert torch.equal(confidence, ev.classes(images)[1])


# --------------------------------------------------------------------------------- the bars
def test_sampling_shows_a_bar_on_stderr(capsys):
    scheduler = ddpm.build_scheduler(ddpm.DiffusionConfig())
    scheduler.set_timesteps(3)
    z = ddpm.sample_latents(lambda z, t, c: torch.zeros_like(z), scheduler, 5, (1, 2, 2), batch_size=2)
    assert z.shape == (5, 1, 2, 2)
    assert "sampling 5 latents" in capsys.readouterr().err


def test_invdiff_reading_its_samples_shows_a_bar_on_stderr(evaluator, capsys):
    test = load(evaluator.cfg, "test")
    images = torch.cat([test.images[test.label == c][:4] for c in range(10)])           # [C·n, 3, H, W]
    samples = [({"arm": "base", "seed": s, "r": 0.0, "scale": 2.0}, images) for s in (0, 1)]
    rows, _ = invdiff_report.read_samples(samples, evaluator, evaluator.cfg, per_class=4)
    assert len(rows) == 2 and rows[0]["FID_C"] == rows[1]["FID_C"]
    assert "evaluating" in capsys.readouterr().err
