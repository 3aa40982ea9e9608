"""The LOO at a scaled covariance (sensitivity.calibration) and the worker's calibration of its level."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from app.store.calibration import calibration_summary
from app.store.job_config import CalibrationConfig
from sensitivity import compute_sensitivities, influence
from sensitivity.calibration import fit_scale, loo_at, rescale, scale_covariance
from sensitivity.covariance import BlockCovariance, DenseCovariance, KFACCovariance
from worker.calibration import Calibration, heldout_nll, variance_level


def _setup(k=3, n=40):
    torch.manual_seed(0)
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, k, (n,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, k)).double()
    var = [torch.rand_like(p) * 0.5 for p in model.parameters()]
    return model, x, y, var


@pytest.mark.parametrize("form", ["first_order", "second_order", "rayleigh", "diagonal", "corrected"])
def test_rescaling_a_result_equals_the_pass_at_the_scaled_covariance(form):
    model, x, y, var = _setup()
    res = compute_sensitivities(model, (x, y), var, form=form)
    for alpha in (0.2, 5.0, 40.0):  # 40: the caps engage
        ref = compute_sensitivities(model, (x, y), [v * alpha for v in var], form=form)
        got = rescale(res, alpha)
        torch.testing.assert_close(got.loo_losses, ref.loo_losses, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got.deviations, ref.deviations, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got.scores, ref.scores, rtol=1e-9, atol=1e-11)
        assert torch.equal(got.guarded, ref.guarded)
        assert got.loo_probs is not None and torch.allclose(got.loo_probs, ref.loo_probs)
    assert rescale(res, 1.0) is res


@pytest.mark.parametrize("kind", ["diagonal", "dense", "kfac", "block"])
def test_a_scaled_covariance_gives_the_rescaled_result_and_influence(kind):
    model, x, y, var = _setup()
    data = (x, y)
    cov = {"diagonal": lambda: var, "dense": lambda: DenseCovariance.laplace(model, data),
           "kfac": lambda: KFACCovariance.fit(model, data, mc_samples=None),
           "block": lambda: BlockCovariance.with_last_layer(model, var, DenseCovariance.last_layer(model, data)),
           }[kind]()
    form = "rayleigh" if kind == "diagonal" else "corrected"
    res = compute_sensitivities(model, data, cov, form=form)
    probe = {n: torch.randn(4, *p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    base = scale_covariance(model, cov, 1.0)
    for alpha in (0.3, 7.0):
        scaled = scale_covariance(model, cov, alpha)
        assert type(scaled) is type(base)  # the kind (and its fast paths) kept
        for n, t in scaled.apply(probe).items():
            torch.testing.assert_close(t, alpha * base.apply(probe)[n], rtol=1e-10, atol=1e-12)
        ref = rescale(res, alpha)
        got = compute_sensitivities(model, data, scaled, form=form)
        torch.testing.assert_close(got.loo_losses, ref.loo_losses, rtol=1e-8, atol=1e-10)
        # influence at the scaled covariance: the output changes scale as the deviations do (first order exactly)
        fo = influence(model, x[:3], data, scaled, form="first_order")
        fo1 = influence(model, x[:3], data, base, form="first_order")
        torch.testing.assert_close(fo.output_change, alpha * fo1.output_change, rtol=1e-8, atol=1e-12)
    for bad in (0.0, float("nan"), -2.0):
        with pytest.raises(ValueError, match="Invalid scale"):
            scale_covariance(model, cov, bad)


def test_fit_scale_reaches_a_target_and_says_when_it_cannot():
    model, x, y, var = _setup()
    res = compute_sensitivities(model, (x, y), var)
    target = res.loo * 1.7
    alpha, reached = fit_scale(res, target)
    assert reached and alpha > 1 and math.isclose(loo_at(res, alpha), target, rel_tol=1e-3)
    # below the training loss (α → 0) no scale reaches it: the lower bound, not reached
    alpha, reached = fit_scale(res, float(res.losses.double().mean()) * 0.5)
    assert not reached and alpha == pytest.approx(1e-6)
    # a weighted estimate in place of the mean
    w = torch.linspace(0.5, 1.5, len(res), dtype=torch.float64)
    alpha, reached = fit_scale(res, target, lambda v: float((v * w).sum() / w.sum()))
    assert reached and math.isclose(float((rescale(res, alpha).loo_losses * w).sum() / w.sum()), target, rel_tol=1e-3)


def test_bad_scales_and_targets_are_refused_by_name():
    model, x, y, var = _setup()
    res = compute_sensitivities(model, (x, y), var)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Invalid scale"):
            rescale(res, bad)
    with pytest.raises(ValueError, match="Invalid target"):
        fit_scale(res, float("nan"))
    model, x, y, var = _setup(k=40, n=10)
    wide = compute_sensitivities(model, (x, y), var, form="corrected")
    with pytest.raises(ValueError, match="up to 32 outputs"):
        rescale(wide, 2.0)


def test_the_split_is_stratified_bounded_and_refused_when_too_small():
    labels = np.repeat(np.arange(4), [500, 300, 150, 50])
    cal = Calibration(CalibrationConfig(), labels, 1000, seed=0)
    assert len(cal.held) == 50 and cal.active  # 5% of 1,000
    counts = np.bincount(labels[cal.held], minlength=4)
    assert np.abs(counts - np.array([25, 15, 7.5, 2.5])).max() <= 1
    assert set(cal.trained(1000)) | set(cal.held) == set(range(1000)) and not set(cal.trained(1000)) & set(cal.held)
    capped = Calibration(CalibrationConfig(fraction=0.5, max_examples=120), labels, 1000, seed=0)
    assert len(capped.held) == 120
    small = Calibration(CalibrationConfig(), labels[:400], 1000, seed=0)  # 20 < min_examples
    assert not small.active and len(small.held) == 0 and "min_examples" in small.note
    assert len(small.trained(400)) == 400
    off = Calibration(CalibrationConfig(source="none"), labels, 1000, seed=0)
    assert not off.active and len(off.held) == 0




@pytest.mark.parametrize("mode", ["refit", "frozen", "frozen_variance"])
def test_modes_fit_freeze_and_hold_the_variance_level(mode):
    model, x, y, var = _setup()
    res = compute_sensitivities(model, (x, y), var)
    cal = Calibration(CalibrationConfig(source="test", mode=mode, freeze_at=0.3), np.zeros(0), 100, seed=0)
    mean = lambda v: float(v.double().mean())  # noqa: E731
    targets = [res.loo * f for f in (1.5, 1.6, 2.5, 3.0)]
    levels = [1.0, 1.0, 2.0, 4.0]
    scales, fits = [], []
    for step, target, level in zip((10, 30, 60, 100), targets, levels):
        out, m = cal.update(res, mean, target, step, level)
        scales.append(m["calibration_scale"])
        fits.append(m["calibration_fit"])
        assert m["loo_raw"] == pytest.approx(res.loo) and out.loo == pytest.approx(loo_at(res, m["calibration_scale"]))
    if mode == "refit":
        assert scales == fits
    else:
        frozen = math.exp((math.log(fits[0]) + math.log(fits[1])) / 2)  # the fits up to 30% of 100 steps
        expect = [fits[0], frozen, frozen, frozen]
        if mode == "frozen_variance":
            expect = [fits[0], frozen, frozen / 2, frozen / 4]  # σ² doubled, then quadrupled: ασ² held
        assert scales == pytest.approx(expect)
        state = cal.state_dict()
        again = Calibration(CalibrationConfig(source="test", mode=mode, freeze_at=0.3), np.zeros(0), 100, seed=0)
        again.load_state_dict(state)
        _, m = again.update(res, mean, targets[-1], 120, levels[-1])
        assert m["calibration_scale"] == pytest.approx(expect[-1])


def test_a_fixed_scale_fits_nothing():
    model, x, y, var = _setup()
    res = compute_sensitivities(model, (x, y), var)
    cal = Calibration(CalibrationConfig(scale=3.0), np.arange(1000) % 2, 100, seed=0)
    assert len(cal.held) == 0 and cal.fixed
    out, m = cal.update(res, lambda v: float(v.mean()), None, 5, None)
    assert m["calibration_scale"] == 3.0 and "calibration_fit" not in m
    assert out.loo == pytest.approx(loo_at(res, 3.0))


def test_heldout_nll_and_variance_level():
    model, x, y, var = _setup()
    nll, se = heldout_nll(model, x, y, torch.arange(0, 40, 2), chunk=3)
    ref = nn.functional.cross_entropy(model(x[::2]), y[::2], reduction="none").double().detach()
    assert nll == pytest.approx(float(ref.mean())) and se == pytest.approx(float(ref.std() / math.sqrt(20)))
    assert variance_level({"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([0.0, 16.0])}) == pytest.approx(4.0)
    assert variance_level(object()) is None


def test_the_summary_says_what_the_level_is_calibrated_on():
    on = {"calibration": {"mode": "frozen_variance"}}
    m = {"calibration_scale": 2.0, "calibration_fit": 2.8, "calibration_nll": 0.41, "calibration_nll_se": 0.02,
         "calibration_examples": 1000, "calibration_step": 600, "loo_raw": 0.2}
    s = calibration_summary(on, m)
    assert s["calibrated"] and s["drift"] == pytest.approx(1.4) and s["warning"]
    assert "1,000 training examples held out" in s["line"] and "step 600" in s["line"] and "1.40×" in s["line"]
    ok = calibration_summary(on, {**m, "calibration_fit": 2.2})
    assert not ok["warning"] and "within ±25%" in ok["line"]
    refit = calibration_summary({"calibration": {"mode": "refit"}}, {**m, "calibration_fit": 2.0})
    assert "refitted at every evaluation" in refit["line"] and refit["drift"] is None and not refit["warning"]
    assert refit["reached"]  # a run from before calibration_reached: not known to have failed
    low = calibration_summary({"calibration": {"mode": "refit"}},
                              {**m, "calibration_fit": 1e-6, "calibration_scale": 1e-6, "calibration_reached": 0.0})
    assert low["warning"] and low["reached"] is False and "could not reach the held-out NLL 0.41" in low["line"]
    assert "training loss at the mean already exceeds" in low["line"] and "its mean is" not in low["line"]
    high = calibration_summary({"calibration": {"mode": "refit"}},
                               {**m, "calibration_fit": 1e6, "calibration_scale": 1e6, "calibration_reached": 0.0})
    assert "even at the largest scale" in high["line"]
    tiny = calibration_summary({"calibration": {"mode": "refit"}}, {**m, "calibration_nll_se": 0.2,
                                                                    "calibration_examples": 71})
    assert tiny["warning"] and "With 71 held-out examples the level itself is uncertain by ±49%" in tiny["line"]
    none = calibration_summary({"calibration": {"source": "none"}}, {"loo_raw": 0.1})
    assert not none["calibrated"] and "calibration.source is none" in none["line"]
    few = calibration_summary({"calibration": {}}, {"loo_raw": 0.1})
    assert "min_examples" in few["line"]
    assert "none configured" in calibration_summary({"lr": 0.1}, {"train_nll": 0.1})["line"]
    fixed = calibration_summary({"calibration": {"scale": 3.0}}, {"calibration_scale": 3.0, "loo_raw": 0.1})
    assert fixed["source"] == "fixed" and "fixed scale 3" in fixed["line"]
    assert calibration_summary({"calibration": "garbage"}, None)["line"].startswith("LOO uncalibrated (no evaluation")


def test_the_calibration_study_runs_end_to_end_on_a_small_setting():
    """research.calibration's pipeline on a small setting: the refit policy's LOO is the split's NLL, the report
    says what each candidate scored."""
    from research.calibration import POLICIES, report, run, score, series
    from research.calibration_data import synthetic
    from sensitivity.calibration import rescale
    from worker.models import mlp

    out = run(synthetic(600, 400, 0), lambda: mlp(40, 10, (32,)), 4, 0.3, 1e-3, 0, batch=64)
    ev = out["evals"]
    assert out["n_cal"] == 30 and out["n_train"] == 570 and len(ev) == 4
    assert 0 < out["split_noise"]["sd"] < 1 and 0 <= out["split_noise"]["miss"] <= 1 and ev[-1]["cal_se"] > 0
    refit, _ = series(ev, "refit")
    for e, loo in zip(ev, refit):
        if e["reached"]:
            assert loo == pytest.approx(e["cal_nll"], rel=1e-3)
    _, alpha = series(ev, "refit_prob")  # the last evaluation's: the LOO's mean probability of the label is the split's
    probs = rescale(ev[-1]["res"], alpha).loo_losses.double().neg().exp()
    assert float(probs.mean()) == pytest.approx(ev[-1]["cal_prob"], rel=1e-3)
    rows = {p: score(series(ev, p)[0], ev) for p in POLICIES}
    meta = {"n_train": 570, "n_cal": 30, "cost": 1.0, "cal_cost": 0.01, "alpha_first": 1.0, "alpha_last": 2.0,
            "share": 0.9, "test_acc": 0.5, "cal_nll": [ev[-1]["cal_nll"]], "test_nll": [ev[-1]["test_nll"]],
            "cal_se": ev[-1]["cal_se"], "split_noise": out["split_noise"]}
    text = report({"settings": {"tiny": {"clean": True, "epochs": 4, "hess_init": 0.3, "weight_decay": 1e-3,
                                         "seeds": {0: {**rows, "meta": meta}}}}, "transfer": {}}, 1.0, "test")
    assert "| refit | 0 |" in text and "| refit_prob | 0 |" in text and "## Summary" in text
    assert "| refit, first order | 0 |" in text and out["pass_ratio"] > 0
    assert "splits of its size drawn from the test set" in text and "the chance that a run misses" in text
    first, _ = series(ev, "refit, first order")  # the first-order pass's own fit: the split's NLL as well
    assert ev[-1]["res_first"].form == "first_order" and ev[-1]["res"].form == "rayleigh"
    if ev[-1]["reached"]:
        assert first[-1] == pytest.approx(ev[-1]["cal_nll"], rel=1e-3)


def test_a_calibrated_job_scores_auto_in_first_order_and_an_uncalibrated_one_in_the_covariances_form():
    labels = np.repeat(np.arange(10), 100)
    calibrated = Calibration(CalibrationConfig(), labels, 100, seed=0)
    uncalibrated = Calibration(CalibrationConfig(source="none"), labels, 100, seed=0)
    fixed = Calibration(CalibrationConfig(scale=2.0), labels, 100, seed=0)
    assert calibrated.form("auto", "rayleigh") == fixed.form("auto", "rayleigh") == "first_order"
    assert uncalibrated.form("auto", "rayleigh") == "auto"  # the library's auto: Rayleigh for σ²
    assert calibrated.form("auto", "rayleigh", monitor="loo_capped") == "auto"  # stopping on the cap keeps it
    assert calibrated.form("rayleigh", "rayleigh") == "rayleigh"  # a form the config names is kept
    assert calibrated.form("auto", "corrected") == "auto"  # a dense covariance: corrected, exact


def test_bad_calibration_configs_are_refused_naming_the_field():
    from app.store.job_config import ConfigError, parse_config

    for bad, field in (({"fraction": 0}, "calibration.fraction"), ({"fraction": 0.9}, "calibration.fraction"),
                       ({"mode": "bogus"}, "calibration.mode"), ({"scale": -1.0}, "calibration.scale"),
                       ({"scale": float("nan")}, "calibration.scale"), ({"max_examples": 10**12},
                                                                        "calibration.max_examples"),
                       ({"source": "elsewhere"}, "calibration.source"), ({"freeze_at": 0}, "calibration.freeze_at"),
                       ({"extra": 1}, "calibration.extra")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_config({"calibration": bad})
    assert parse_config({"calibration": {"max_examples": 500.0}}).calibration.max_examples == 500  # JSON's 500.0
