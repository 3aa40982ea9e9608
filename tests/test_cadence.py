"""worker.cadence: the rotation covers every example once per cycle, the sampled LOO's standard error is what
repeated sampling gives, the control variate shrinks it, the plan keeps evaluations within the budget."""

import io

import numpy as np
import pytest
import torch

from worker.cadence import FLOOR, Cadence
from worker.sampling import loo_estimate, stratified_permutation


def test_every_prefix_of_a_stratified_permutation_holds_the_classes_in_proportion():
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    order = stratified_permutation(labels, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    for k in (10, 50, 137, 600):
        counts = np.bincount(labels[order[:k]], minlength=3)
        assert np.all(np.abs(counts - k * np.array([0.5, 0.3, 0.2])) <= 1.0)


def test_the_rotation_scores_every_example_once_per_cycle_and_never_twice_in_one_evaluation():
    labels = np.random.default_rng(1).integers(0, 4, size=103)
    cad = Cadence(labels, budget=0.1, every=None, steps_per_epoch=10)
    cad.trained(1.0, 10)  # past the first epoch (its slices are scored again: the next test)
    seen = []
    for _ in range(12):  # 12 slices of 25 across three cycle boundaries (103 is not a multiple of 25)
        part = cad.take(25)
        assert len(part) == len(set(part.tolist())) == 25
        seen.append(part)
    flat = np.concatenate(seen)
    assert len(set(flat[:100].tolist())) == 100  # the first cycle: each example once
    assert set(np.concatenate(seen[:5]).tolist()) == set(range(103))  # and the fifth slice finishes it
    assert cad.cycles == 3
    counts = np.bincount(flat, minlength=103)
    assert counts.min() >= 2 and counts.max() <= 3  # 300 scorings over 103 examples, spread evenly


def test_the_slices_of_the_first_epoch_are_scored_again_first_once_it_is_over():
    labels = np.random.default_rng(3).integers(0, 3, size=200)
    cad = Cadence(labels, budget=0.1, every=None, steps_per_epoch=10)
    cad.trained(0.5, 3)
    early = [cad.take(30), cad.take(30)]  # two evaluations within the first epoch: different examples
    assert not set(early[0].tolist()) & set(early[1].tolist())
    cad.trained(1.0, 7)
    state = cad.state_dict()
    again = cad.take(80)
    assert set(np.concatenate(early).tolist()) <= set(again.tolist())  # the first epoch's 60 first, then 20 more
    assert not set(cad.take(60).tolist()) & set(again.tolist())  # and on from there, once
    resumed = Cadence(labels, budget=0.1, every=None, steps_per_epoch=10)
    resumed.load_state_dict(state)  # a resume just before it restarts the same way
    np.testing.assert_array_equal(resumed.take(80), again)
    old = {k: v for k, v in state.items() if k != "restarted"}
    old["steps_trained"] = 25
    legacy = Cadence(labels, budget=0.1, every=None, steps_per_epoch=10)
    legacy.load_state_dict(old)  # a checkpoint from before the restart existed, past the first epoch: no restart
    legacy.take(10)
    assert legacy.pos == state["pos"] + 10


def test_a_full_pass_has_no_sampling_error_and_the_stratified_error_matches_repeated_sampling():
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], [3000, 1000])
    losses = np.where(labels == 0, rng.exponential(0.2, 4000), rng.exponential(2.0, 4000))
    pop = np.bincount(labels)
    assert loo_estimate(losses, labels, pop) == (pytest.approx(losses.mean()), 0.0)
    estimates, errors = [], []
    for seed in range(400):
        take = stratified_permutation(labels, np.random.default_rng(seed))[:200]
        m, se = loo_estimate(losses[take], labels[take], pop)
        estimates.append(m)
        errors.append(se)
    assert np.mean(estimates) == pytest.approx(losses.mean(), rel=0.01)  # unbiased
    assert np.median(errors) == pytest.approx(np.std(estimates), rel=0.15)  # the error it states is the real one


def test_a_correlated_control_variate_shrinks_the_error_and_keeps_the_estimate_unbiased():
    rng = np.random.default_rng(3)
    n = 5000
    labels = rng.integers(0, 10, n)
    train = rng.exponential(0.3, n) + 5 * (rng.random(n) < 0.05)  # a few mislabeled: large losses
    loo = train * 1.2 + rng.normal(0, 0.05, n)
    pop = np.bincount(labels)
    plain, controlled, estimates = [], [], []
    for seed in range(300):
        take = np.random.default_rng(seed).choice(n, 150, replace=False)
        plain.append(loo_estimate(loo[take], labels[take], pop)[1])
        m, se = loo_estimate(loo[take], labels[take], pop, control=(train[take], train))
        controlled.append(se)
        estimates.append(m)
    assert np.median(controlled) < 0.2 * np.median(plain)
    assert np.mean(estimates) == pytest.approx(loo.mean(), rel=0.01)
    assert np.median(controlled) == pytest.approx(np.std(estimates), rel=0.2)
    nan = np.full(n, np.nan)  # examples not trained on yet: no control
    assert loo_estimate(loo[:150], labels[:150], pop, control=(nan[:150], nan))[1] == pytest.approx(
        loo_estimate(loo[:150], labels[:150], pop)[1])


def test_the_plan_keeps_the_evaluations_within_the_budget():
    labels = np.random.default_rng(4).integers(0, 10, 20000)
    cad = Cadence(labels, budget=0.15, every=None, steps_per_epoch=300)
    step_s, per_example, fixed = 0.01, 0.002, 0.2  # a simulated job's seconds
    step, evaluations, scored = 0, 0, 0
    while step < 3000:
        step += 1
        cad.trained(step_s)
        if cad.needs_plan(step):
            cad.apply(cad.plan(step))
        if cad.due(step, step == 3000):
            k = len(cad.take())
            scored += k
            evaluations += 1
            cad.evaluated(per_example * k, fixed, k, estimate=0.5, se=0.5 * 2 / np.sqrt(k))
            cad.apply(cad.plan(step))
    train = 3000 * step_s
    last = fixed + per_example * cad.next_size  # the last evaluation is due whatever the credit
    assert cad.spent_s <= 0.15 * train + last + 1e-9
    assert evaluations >= 4 and scored >= 4 * FLOOR


def test_no_evaluation_is_planned_that_would_leave_the_last_one_without_its_slice():
    """Before: a 3-epoch job evaluated at epoch 2.5 with nearly all the credit and its last evaluation (the run's
    result) scored 64 examples (bench/overhead.py): a stale ranking and a wide standard error at the end."""
    labels = np.random.default_rng(5).integers(0, 10, 20000)

    def simulate(total):
        cad = Cadence(labels, budget=0.15, every=None, steps_per_epoch=300, total_steps=total)
        step, sizes = 0, []
        while step < total:
            step += 1
            cad.trained(0.01)
            if cad.needs_plan(step):
                cad.apply(cad.plan(step))
            if cad.due(step, step == total):
                k = len(cad.take(cad.last_size() if step == total else None))
                sizes.append((step, k))
                cad.evaluated(0.002 * k, 0.2, k, estimate=0.5, se=0.05)
                cad.apply(cad.plan(step))
        return cad, sizes

    cad, sizes = simulate(9000)  # without total_steps: (8866, 350), then (9000, 64)
    step, last = sizes[-1]
    assert step == 9000 and last >= 0.9 * max(k for _, k in sizes[1:])  # the last slice as large as any
    assert len(sizes) >= 10  # and evaluations along the way
    assert cad.spent_s <= 0.15 * 90.0 + 0.2 + 0.002 * cad.next_size + 1e-9  # within the budget


def test_a_fixed_cadence_scores_everything_without_a_budget_and_what_the_budget_pays_with_one():
    labels = np.arange(1000) % 5
    full = Cadence(labels, budget=None, every=7, steps_per_epoch=100)
    due = []
    for s in range(1, 30):
        if full.due(s, False):
            due.append(s)
            full.apply(full.plan(s))
    assert due == [7, 14, 21, 28]
    assert len(full.take()) == 1000
    capped = Cadence(labels, budget=0.1, every=50, steps_per_epoch=100)
    capped.trained(1.0, 100)  # 10 ms a step
    capped.evaluated(0.5, 0.01, 500)  # 1 ms an example
    # 50 steps x 10 ms x 0.1 = 50 ms: 40 examples after the fixed 10 ms, raised to the floor
    assert capped.plan(50) == {"step": 100, "size": FLOOR, "sweep": 0}  # no screen checked yet


def test_the_state_survives_a_checkpoint_loaded_with_weights_only():
    labels = np.random.default_rng(5).integers(0, 3, 500)
    a = Cadence(labels, budget=0.2, every=None, steps_per_epoch=20, seed=9)
    a.trained(3.0, 100)
    a.warmed_up(0.25)
    a.take(70)
    a.evaluated(0.3, 0.1, 70, estimate=1.0, se=0.1)
    a.apply(a.plan(100))
    buf = io.BytesIO()
    torch.save({"cadence": a.state_dict()}, buf)
    buf.seek(0)
    b = Cadence(labels, budget=0.2, every=None, steps_per_epoch=20, seed=0)
    b.load_state_dict(torch.load(buf, weights_only=True)["cadence"])
    assert b.plan(100) == a.plan(100) and b.warmup_s == a.warmup_s == 0.25
    assert b.take(300).tolist() == a.take(300).tolist()  # the same rotation, across the cycle's end


def test_the_job_config_takes_a_cadence_in_steps_or_epochs_and_names_a_bad_one():
    from app.store.job_config import diagnostics_budget, eval_steps
    from worker.config import ConfigError, parse_config

    for every, steps in ((25, 25), (25.0, 25), ("25 steps", 25), ("2 epochs", 20), ("0.5 epoch", 5), ("0.01 epoch", 1)):
        cfg = parse_config({"eval_every": every})
        assert eval_steps(cfg.eval_every, 10) == steps and diagnostics_budget(cfg) is None
    cfg = parse_config({})
    assert cfg.eval_every is None and diagnostics_budget(cfg) == 0.15  # the default: the budget decides
    assert diagnostics_budget(parse_config({"eval_every": 5, "diagnostics": {"budget": 0.3}})) == 0.3
    for bad, field in (({"eval_every": "0 epochs"}, "eval_every"), ({"eval_every": "2 weeks"}, "eval_every"),
                       ({"eval_every": 0}, "eval_every"), ({"diagnostics": {"budget": 0}}, "diagnostics.budget"),
                       ({"diagnostics": {"budget": 1e999}}, "diagnostics.budget"),
                       ({"diagnostics": {"se_target": -1}}, "diagnostics.se_target"),
                       ({"early_stopping": {"min_delta_se": -1}}, "early_stopping.min_delta_se"),
                       ({"diagnostics": {"screen_min_spearman": 2}}, "diagnostics.screen_min_spearman"),
                       ({"diagnostics": {"screen_min_spearman": float("nan")}}, "diagnostics.screen_min_spearman"),
                       ({"diagnostics": {"screen": "sometimes"}}, "diagnostics.screen")):
        with pytest.raises(ConfigError, match=rf"\n  {field}: "):
            parse_config(bad)


def test_the_last_evaluation_scores_no_more_than_the_credit_left_pays_for():
    cad = Cadence(np.arange(5000) % 10, budget=0.1, every=None, steps_per_epoch=100)
    cad.trained(10.0, 1000)  # credit 1 s
    cad.evaluated(0.4, 0.2, 400, estimate=1.0, se=0.05)  # 1 ms an example, 0.2 s fixed: 0.4 s of credit left
    cad.apply({"step": 2000, "size": 3000})
    assert cad.last_size() in (199, 200)  # (0.4 - 0.2) s / 1 ms, floored
    plan = cad.plan(1000)
    cad.warmed_up(0.1)  # the first pass's one-time costs: the last slice pays them, the plan along the way does not
    assert cad.plan(1000) == plan and cad.last_size() in (99, 100)
    cad.apply({"step": 2000, "size": 3000})
    cad.spent_s = 5.0
    assert cad.last_size() == FLOOR  # out of credit: the floor still
    cad.fixed = 5.0  # every example (5 s) costs more than the budget (1 s): still the floor
    assert cad.last_size() == FLOOR
    cad.trained(40.0, 1000)  # budget 5 s: every example (5 s) costs no more than the fixed part nor the budget
    assert cad.last_size() == 5000
    assert Cadence(np.arange(50) % 2, budget=None, every=5, steps_per_epoch=10).last_size() == 50


def test_the_standard_error_holds_its_coverage_on_heavy_tailed_losses():
    """LOO losses are heavy-tailed: the regression estimator's residual formula let a few large losses steer the
    slope and under-covered (0.78 of draws within 1.96 SE at n = 64 on this population); the jackknife holds."""
    rng = np.random.default_rng(0)
    n_all = 2000
    loo = np.exp(rng.normal(-2, 1.5, n_all))
    train = loo * np.exp(rng.normal(0, 0.7, n_all))  # correlated, not a copy
    labels = rng.integers(0, 10, n_all)
    pop, full = np.bincount(labels), loo.mean()
    for n, floor in ((64, 0.88), (256, 0.91)):
        inside = 0
        for seed in range(600):
            take = np.random.default_rng(seed).choice(n_all, n, replace=False)
            m, se = loo_estimate(loo[take], labels[take], pop, control=(train[take], train))
            inside += abs(m - full) <= 1.96 * se
        assert inside / 600 >= floor, (n, inside / 600)


def test_the_take_all_stratum_is_counted_exactly_and_shrinks_the_error_of_a_heavy_tail():
    from worker.sampling import TAKE_ALL, take_all

    rng = np.random.default_rng(1)
    n_all = 2000
    loo = np.exp(rng.normal(-2, 1.5, n_all))
    train = loo * np.exp(rng.normal(0, 0.7, n_all))
    labels = rng.integers(0, 10, n_all)
    pop, full = np.bincount(labels), loo.mean()
    top = take_all(train, 256)
    assert len(top) == int(TAKE_ALL * 256) and set(top) == set(np.argsort(-train)[: len(top)])
    assert len(take_all(np.where(np.arange(n_all) == 5, np.nan, train), 256)) == 0  # not every loss known yet
    assert len(take_all(train, n_all)) == 0 and len(take_all(None, 256)) == 0  # a full pass; other ranks
    rest = np.setdiff1d(np.arange(n_all), top)
    everyone = np.union1d(rest, top)  # the rest scored whole: exact, no error
    m, se = loo_estimate(loo[everyone], labels[everyone], pop, control=(train[everyone], train[rest]),
                         certain=np.isin(everyone, top))
    assert m == pytest.approx(full, rel=1e-12) and se == 0.0
    errors, inside = [], 0
    for seed in range(400):
        s = np.union1d(np.random.default_rng(seed).choice(rest, 256 - len(top), replace=False), top)
        m, se = loo_estimate(loo[s], labels[s], pop, control=(train[s], train[rest]), certain=np.isin(s, top))
        errors.append(m - full)
        inside += abs(m - full) <= 1.96 * se
    plain = [loo_estimate(loo[s], labels[s], pop, control=(train[s], train))[0] - full
             for s in (np.random.default_rng(seed).choice(n_all, 256, replace=False) for seed in range(400))]
    assert abs(np.mean(errors)) < 0.02 * full  # unbiased
    assert np.sqrt(np.mean(np.square(errors))) < 0.7 * np.sqrt(np.mean(np.square(plain)))
    assert inside / 400 >= 0.9


def _simulate_screening(agrees=True, per_screened=0.00005, total=6000, n=20000, budget=0.25):
    """A simulated 20-epoch job (300 steps an epoch, 10 ms a step: 0.15 ms a trained example; a screened one a third
    of that, a scored one 0.3 ms, as the CNN's in bench/overhead.py) whose evaluations check the screen on their slice
    (``agrees``) and sweep what the plan says; returns the cadence, each evaluation's (step, slice, sweep) and the
    step each example was last scored or screened at."""
    labels = np.random.default_rng(6).integers(0, 10, n)
    cad = Cadence(labels, budget=budget, every=None, steps_per_epoch=300, total_steps=total)
    last_seen = np.full(n, -1)
    gaps, evals = [], []
    step = 0
    while step < total:
        step += 1
        cad.trained(0.01)
        if cad.needs_plan(step):
            cad.apply(cad.plan(step))
        if cad.due(step, step == total):
            part = cad.take(cad.last_size() if step == total else None)
            k = cad.sweep_now(step == total)
            cad.evaluated(0.0003 * len(part), 0.2, len(part), estimate=0.5, se=0.005)
            swept = cad.take_screen(k, step) if k else np.zeros(0, np.int64)
            swept = np.setdiff1d(swept, part) if agrees else swept[:0]  # written only where the check agrees
            cad.screen_checked(agrees, per_screened * (len(part) + len(swept)), len(part) + len(swept))
            fresh = np.union1d(part, swept)
            prev = last_seen[fresh]
            gaps.append(step - prev[prev >= 0].min() if (prev >= 0).any() else 0)
            last_seen[fresh] = step
            evals.append((step, len(part), len(swept)))
            cad.apply(cad.plan(step))
    return cad, evals, last_seen


def test_a_screen_that_agrees_covers_every_example_each_coverage_period_within_the_budget():
    cad, evals, last_seen = _simulate_screening()  # budget 0.25: the sweeps along the way cost ≤ SCREEN_SHARE of it
    assert sum(1 for *_, s in evals[:-1] if s) >= 5 and evals[0][2] == 0  # the pilot checks; the sweeps come after
    # every example scored or screened within a coverage period (5 epochs = 1500 steps, and the margin) of the last
    # sweep along the way, and at the end: the last evaluation screens every example its slice does not score
    swept = max(step for step, _, k in evals[:-1] if k)
    assert swept >= 6000 - 1500 and (last_seen[last_seen < 6000] >= swept - 1500 * 1.1).all()
    step, part, k = evals[-1]
    assert step == 6000 and part + k == 20000 and (last_seen == 6000).all()
    # within the budget (the last slice may pass it by its fixed cost), but for the last sweep: 1 s, a third of an
    # epoch's 3 s
    assert cad.spent_s - 0.00005 * 20000 <= 0.25 * 60.0 + 0.2 + 0.0003 * part + 1e-9
    slices = [k for _, k, _ in evals[1:]]
    assert max(slices) < 20000 / 4  # the exact slices no longer carry the coverage


def test_a_screen_that_disagrees_or_costs_too_much_is_not_swept_and_the_exact_rotation_covers():
    for kwargs in ({"agrees": False}, {"per_screened": 0.0005}):  # 3× a trained example: more than the budget
        cad, evals, _ = _simulate_screening(**kwargs)
        # a costly screen sweeps once along the way, on the guess of its cost (a forward's), and stops once it has
        # been timed; the last evaluation screens what half an epoch's training time pays for (3,000 of 20,000)
        assert sum(1 for *_, s in evals[:-1] if s) <= (0 if "agrees" in kwargs else 1), kwargs
        _, part, k = evals[-1]
        assert k == 0 if "agrees" in kwargs else 3000 - part <= k <= 3000, (kwargs, part, k)
        assert not cad.screening()
        # the exact slices are sized for coverage again (here: as large as an evaluation every 2 epochs allows),
        # not for the standard error alone (64 while the screen covers)
        assert max(k for _, k, _ in evals[1:]) > 4 * FLOOR


def test_the_screens_rotation_survives_a_checkpoint_and_an_older_state_loads_without_it():
    cad, _, _ = _simulate_screening(total=1200)
    buf = io.BytesIO()
    torch.save(cad.state_dict(), buf)
    buf.seek(0)
    again = Cadence(cad.labels, budget=0.15, every=None, steps_per_epoch=300, total_steps=1200)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.screen_ok and again.checked and again.next_sweep == cad.next_sweep
    np.testing.assert_array_equal(again.take_screen(500, 1300), cad.take_screen(500, 1300))
    old = {k: v for k, v in cad.state_dict().items() if not k.startswith("screen") and k not in
           ("per_screened", "checked", "next_sweep")}
    legacy = Cadence(cad.labels, budget=0.15, every=None, steps_per_epoch=300)
    legacy.load_state_dict(old)
    assert not legacy.screen_ok and not legacy.screening() and legacy.next_sweep == 0


def test_the_screens_rotation_moves_on_only_when_the_check_agrees():
    labels = np.random.default_rng(7).integers(0, 10, 1000)
    cad = Cadence(labels, budget=0.25, every=None, steps_per_epoch=100, total_steps=3000)
    first = cad.take_screen(300, 200)
    cad.screen_checked(False, 0.01, 300 + 64)  # the screen disagreed: its sweep was not written
    assert cad.screen_pos == 0 and cad.screened_to == 0
    again = cad.take_screen(300, 400)
    np.testing.assert_array_equal(again, first)  # the same examples come first next time
    cad.screen_checked(True, 0.01, 300 + 64)
    assert cad.screen_pos == 300 and cad.screened_to == 400
    after = cad.take_screen(300, 600)
    assert len(np.intersect1d(after, first)) == 0  # the cycle goes on past the examples written
    cad.screen_checked(True, 0.01, 64)
    # a wrap: the permutation is kept from cycle to cycle, so the next cycle starts with the first examples again
    cad.take_screen(400, 800)
    cad.screen_checked(True, 0.01, 464)
    np.testing.assert_array_equal(cad.take_screen(300, 1000), first)
