"""The validation experiments. Each returns plain dicts/lists that ``report`` turns into tables and plots."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from torch import nn

from ivon_core import all_metrics, matched_beta2, predict
from research.estimators import ESTIMATORS, estimate, refine, test_nll
from research.setups import HESS_INIT, Split, breast_cancer, digits, flip_labels, make_model, train
from sensitivity import adamw_variance, compute_sensitivities, ivon_variance, sgd_variance
from sensitivity.covariance import DenseCovariance, KFACCovariance, prior_from_weight_decay
from sensitivity.retrain import fit_map, leave_one_out, map_objective
from worker.data import flip

FORMS = ("first_order", "corrected", "rayleigh")  # the last is the default; its cost is reported


def _sampled_probs(model: nn.Module, x: torch.Tensor, var, samples: int, seed: int) -> torch.Tensor:
    """MC-averaged softmax with weights drawn from N(θ, σ²) for a per-parameter σ² (AdamW/SGD heuristics)."""
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    means = [p.detach().clone() for p in params]
    sig = [var.variances[n].sqrt() for n, _ in model.named_parameters()] if hasattr(var, "variances") else \
        [v.sqrt() for v in (var.values() if isinstance(var, dict) else var)]
    out = 0
    with torch.no_grad():
        model.eval()
        for _ in range(samples):
            for p, m, s in zip(params, means, sig):
                p.copy_(m + s * torch.randn(m.shape, generator=g, dtype=m.dtype))
            out = out + model(x).softmax(-1)
        for p, m in zip(params, means):
            p.copy_(m)
    return out / samples


def optimizers(seeds=(0, 1, 2), epochs: int = 30, samples: int = 20) -> list[dict]:
    """E1: IVON vs AdamW vs SGD on digits (MLP, small CNN): metrics at the mean and MC-averaged."""
    rows = []
    for kind in ("mlp", "cnn"):
        split = digits(images=kind == "cnn")
        for opt_name in ("ivon", "adamw", "sgd"):
            for seed in seeds:
                lr = 0.2 if (kind == "cnn" and opt_name == "ivon") else None
                model, opt, secs = train(kind, opt_name, split, epochs, seed, lr=lr)
                model.eval()
                with torch.no_grad():
                    mean_p = model(split.xte).softmax(-1)
                if opt_name == "ivon":
                    mc_p = predict(model, split.xte, opt, mc_samples=samples).mc
                elif opt_name == "adamw":
                    mc_p = _sampled_probs(model, split.xte, adamw_variance(opt, split.n, model, 1e-4), samples, seed)
                else:
                    prior = prior_from_weight_decay(1e-4, split.n)
                    var = sgd_variance(model, (split.xtr, split.ytr), prior_precision=prior)
                    mc_p = _sampled_probs(model, split.xte, var, samples, seed)
                rows.append({"model": kind, "optimizer": opt_name, "seed": seed, "train_s": secs,
                             "mean": all_metrics(mean_p, split.yte), "mc": all_metrics(mc_p, split.yte)})
    return rows


def tracking_settings(ep_scale: float = 1.0, evals: int = 8) -> list[tuple[dict, bool]]:
    """The report's tracking set-ups as (``tracking`` arguments, has memorized label noise): digits with a weak and a
    regularizing weight decay, clean breast cancer (nearly separable: the training loss goes to ~0 while the test
    NLL barely moves), breast cancer with 15% and digits with 20% of the labels flipped."""
    weak_and_regularized = [({"weight_decay": wd, "epochs": int(100 * ep_scale) or 10, "evals": evals}, False)
                            for wd in (1e-4, 3e-3)]
    separable = ({"weight_decay": 1e-3, "n_train": 200, "epochs": int(150 * ep_scale) or 10, "evals": evals + 2,
                  "dataset": "breast_cancer"}, False)
    return weak_and_regularized + [separable,
        ({"weight_decay": 1e-3, "n_train": 200, "epochs": int(150 * ep_scale) or 10, "evals": evals + 2,
          "dataset": "breast_cancer", "label_noise": 0.15}, True),
        ({"weight_decay": 1e-3, "epochs": int(150 * ep_scale) or 10, "evals": evals + 4, "label_noise": 0.2}, True)]


def tracking(weight_decay: float, estimators: tuple[str, ...], n_train: int = 300, epochs: int = 150,
             evals: int = 10, n_truth: int | None = None, top_truth: int = 10, seed: int = 0,
             dataset: str = "digits", label_noise: float = 0.0, forms: tuple[str, ...] = FORMS,
             hess_init: float = HESS_INIT) -> dict:
    """E2: LOO estimates against the test NLL over training on an overfitting subset, and against retraining.

    The truth retrains without every training example (``n_truth=None``); a sample of LOO losses is too noisy for
    it (they are heavy-tailed: 30 random examples of 300 put the true LOO at half its value in one setting).
    With ``n_truth``, that many random examples plus the ``top_truth`` ranked highest (reduced runs).

    With ``label_noise``, that fraction of the training labels is flipped (the model memorizes them: a U-shaped
    test curve) and the test labels are flipped alike, since the LOO estimates the loss on data like the training
    data; the clean test NLL is kept beside it."""
    split = (digits if dataset == "digits" else breast_cancer)(n_train, seed, torch.float64)
    clean_yte = split.yte
    if label_noise:
        split = flip_labels(split, label_noise, "uniform", seed)
        noisy_yte, _ = flip(split.yte, int(split.ytr.max()) + 1, label_noise, "uniform", seed + 7)
        split = Split(split.xtr, split.ytr, split.xte, noisy_yte, split.flipped)
    batch = 32
    steps = epochs * ((split.n + batch - 1) // batch)
    every = max(1, epochs // evals)
    curves: dict[str, dict] = {}
    runs = {"ivon": {"opt": "ivon", "hess_init": hess_init},
            "ivon_b2": {"opt": "ivon", "beta2": matched_beta2(steps), "hess_init": hess_init},
            "adamw": {"opt": "adamw"}, "sgd": {"opt": "sgd"}}
    run_of = {e: ESTIMATORS[e][1] if ESTIMATORS[e][1] in runs else "ivon" for e in estimators}  # the run it reads
    needed = set(run_of.values())
    final: dict[str, tuple] = {}
    run_final: dict[str, tuple] = {}  # run → (final mean, a result at it, for the ranked truth picks)
    for run_name in sorted(needed):
        cfg = runs[run_name]
        users = [e for e in estimators if run_of[e] == run_name]
        epoch_s: list[float] = []

        def cb(ep, model, opt, dt, users=users, run_name=run_name, epoch_s=epoch_s):
            epoch_s.append(dt)
            if ep % every and ep != epochs:
                return
            for est in users:
                res, secs, at = estimate(est, model, opt, split, weight_decay, forms)
                c = curves.setdefault(est, {"epoch": [], "test_nll": [], "clean_test_nll": [], "train_nll": [],
                                            "seconds": [], "capped": [], "hess_init_share": []}
                                      | {f: [] for f in forms})
                c["epoch"].append(ep)
                c["test_nll"].append(test_nll(at, split))
                c["clean_test_nll"].append(test_nll(at, Split(split.xtr, split.ytr, split.xte, clean_yte)))
                c["train_nll"].append(float(res[forms[0]].losses.mean()))
                c["seconds"].append(secs[forms[-1]] / max(np.mean(epoch_s), 1e-9))
                c["capped"].append(res[forms[-1]].capped)  # the worker's loo_capped
                c["hess_init_share"].append(opt.hess_init_share() if hasattr(opt, "hess_init_share") else None)
                for f in forms:
                    c[f].append(res[f].loo)
                if ep == epochs:
                    final[est] = (res, at)
            if ep == epochs:
                run_final[run_name] = (copy.deepcopy(model), final[users[0]][0]["corrected"])

        _train_small(cfg, split, epochs, seed, weight_decay, batch, cb)
    # truth: leave-one-out retraining at the MAP refined from each IVON run's final mean (the MAP differs between
    # runs of a non-convex model); estimators on AdamW or SGD runs are compared with the first IVON run's truth
    truth_runs = [r for r in ("ivon_b2", "ivon") if r in run_final] or sorted(run_final)
    if n_truth is None:
        rand = list(range(split.n))
        pick = rand
    else:
        g = torch.Generator().manual_seed(seed + 1)
        rand = torch.randperm(split.n, generator=g)[:n_truth].tolist()
        ranked = [int(i) for i in run_final[truth_runs[0]][1].top_k(top_truth) if int(i) not in rand]
        pick = rand + ranked
    truths = {}
    for r in truth_runs:
        t = time.perf_counter()
        # converged (500 L-BFGS steps left a largest gradient entry of 0.02 with memorized flips: every refit
        # below then also finished the base's fit, and where it stopped set the truth)
        base = refine(run_final[r][0], split, weight_decay, 1000, restarts=10)
        _, loss = leave_one_out(base, split.xtr, split.ytr, pick, prior_precision=
                                prior_from_weight_decay(weight_decay, split.n))
        truths[r] = {"true_loss": loss, "true_loo": float(loss[: len(rand)].mean()),
                     "base_grad": _max_grad(base, split, weight_decay),
                     "test_nll_at_map": test_nll(base, split), "seconds": time.perf_counter() - t}

    def truth_of(est: str) -> str:
        return run_of[est] if run_of[est] in truths else truth_runs[0]

    summary = {}
    for est, c in curves.items():
        tn = np.array(c["test_nll"])
        row = {"test_range": float(tn.max() - tn.min()), "cost": float(np.median(c["seconds"])),
               "capped_first": c["capped"][0], "capped_last": c["capped"][-1], "capped_max": max(c["capped"]),
               "hess_init_share": c["hess_init_share"][-1],
               "spearman_capped": float(spearmanr(c["capped"], tn).statistic)
               if len(tn) > 2 and np.ptp(c["capped"]) > 0 else float("nan")}  # never capped: no trend to rank
        for f in forms:
            loo = np.array(c[f])
            row[f"spearman_{f}"] = float(spearmanr(loo, tn).statistic) if len(loo) > 2 else float("nan")
            row[f"spearman_clean_{f}"] = float(spearmanr(loo, c["clean_test_nll"]).statistic) \
                if len(loo) > 2 else float("nan")
            row[f"gap_{f}"] = float(np.mean(np.abs(loo - tn) / tn))
            res = final[est][0][f]
            truth = truths[truth_of(est)]
            row[f"ratio_{f}"] = float(res.loo_losses[rand].mean()) / truth["true_loo"]
            row[f"rank_{f}"] = float(spearmanr(res.loo_losses[pick].numpy(), truth["true_loss"].numpy()).statistic)
        row["truth_run"] = truth_of(est)
        summary[est] = row
    return {"dataset": dataset, "weight_decay": weight_decay, "n_train": split.n, "epochs": epochs, "curves": curves,
            "hess_init": hess_init,
            "label_noise": label_noise, "all_examples": n_truth is None, "summary": summary, "n_truth": len(pick),
            "truths": {r: {k: v for k, v in t.items() if k != "true_loss"} for r, t in truths.items()},
            "true_loo": truths[truth_runs[0]]["true_loo"]}


def _max_grad(model: nn.Module, split: Split, weight_decay: float) -> float:
    """Largest gradient entry of the summed regularized objective: how close the truth's base is to a MAP."""
    params = [p for p in model.parameters() if p.requires_grad]
    obj = map_objective(model, split.xtr, split.ytr, prior_precision=prior_from_weight_decay(weight_decay, split.n))
    return max(float(g.abs().max()) for g in torch.autograd.grad(obj, params))


def _train_small(cfg, split, epochs, seed, weight_decay, batch, cb):
    """A 64-32-10 MLP in float64 (small enough for the dense Laplace reference)."""
    from research import setups

    torch.manual_seed(seed)
    model = setups.mlp(split.xtr.shape[1], int(split.ytr.max()) + 1, (32,), activation="tanh").double()
    steps = epochs * ((split.n + batch - 1) // batch)
    opt = setups.make_optimizer(cfg["opt"], model, split.n, steps, weight_decay, cfg.get("beta2"),
                                hess_init=cfg.get("hess_init", HESS_INIT))
    gen = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        t = time.perf_counter()
        setups.train_epoch(model, opt, split, batch, gen)
        cb(ep + 1, model, opt, time.perf_counter() - t)
    return model, opt, None


def faithfulness(n_examples: int = 30, seed: int = 0) -> list[dict]:
    """E3: predicted vs true leave-one-out change of logits and loss, at the MAP, per covariance and form."""
    rows = []
    for kind, n_train, wd in (("logreg", 1200, 1e-3), ("mlp_tanh", 300, 3e-3), ("cnn_tanh", 300, 3e-3)):
        split = digits(n_train, seed, torch.float64, images=kind.startswith("cnn"))
        model = make_model(kind, seed, torch.float64, hidden=32)
        prior = prior_from_weight_decay(wd, split.n)
        fit_map(model, split.xtr, split.ytr, prior_precision=prior, max_iter=1000)
        pick = torch.randperm(split.n, generator=torch.Generator().manual_seed(seed))[:n_examples].tolist()
        t = time.perf_counter()
        true_df, true_loss = leave_one_out(model, split.xtr, split.ytr, pick, prior_precision=prior)
        truth_s = time.perf_counter() - t
        data = (split.xtr, split.ytr)
        covs = {"dense": DenseCovariance.laplace(model, data, prior_precision=prior),
                "kfac": KFACCovariance.fit(model, data, prior_precision=prior, mc_samples=None),
                "diag_ggn": sgd_variance(model, data, prior_precision=prior)}
        if kind.startswith("cnn"):  # convolutions: K-FAC's cheaper spatial reduction beside the expansion
            covs["kfac_reduce"] = KFACCovariance.fit(model, data, prior_precision=prior, mc_samples=None,
                                                     conv="reduce")
        for cname, cov in covs.items():
            for form in ("first_order", "corrected", "rayleigh", "diagonal"):  # caps: the library's ("auto")
                res = compute_sensitivities(model, (split.xtr[pick], split.ytr[pick]), cov, form=form)
                dloss_pred = (res.loo_losses - res.losses).numpy()
                dloss_true = (true_loss - res.losses).numpy()
                rows.append({"model": kind, "n": split.n, "covariance": cname, "form": form,
                             "pearson_logits": float(pearsonr(res.deviations.flatten(), true_df.flatten())[0]),
                             "pearson_loss": float(pearsonr(dloss_pred, dloss_true)[0]),
                             "ratio": float(res.loo_losses.mean() / true_loss.mean()), "truth_s": truth_s})
    return rows


def _auroc_prec(flipped: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    k = int(flipped.sum())
    top = np.argsort(-score, kind="stable")[:k]
    return float(roc_auc_score(flipped, score)), float(flipped[top].mean())


def _timed_train(kind: str, opt_name: str, split: Split, epochs: int, seed: int, wd: float, callback=None):
    """Train; its cost is epochs × the fastest epoch, robust to a busy machine (noise only slows an epoch)."""
    epoch_s: list[float] = []

    def cb(*a):
        epoch_s.append(a[-1])
        if callback is not None:
            callback(*a)

    model, opt, _ = train(kind, opt_name, split, epochs, seed, wd, callback=cb)
    return model, opt, epochs * min(epoch_s)


def _timed(fn, *args, repeats: int = 3):
    """``fn(*args)``'s result and its fastest time over ``repeats`` calls."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return out, best


def _ivon_pass(model: nn.Module, opt, data):
    return compute_sensitivities(model, data, ivon_variance(opt, model))


def _kfac_pass(model: nn.Module, data, prior: float):
    return compute_sensitivities(model, data, KFACCovariance.fit(model, data, prior_precision=prior))


def flips(settings=((0.1, "uniform"), (0.3, "uniform"), (0.1, "pairs"), (0.3, "pairs")), epochs: int = 150,
          seed: int = 0, evals: int = 10) -> list[dict]:
    """E4: flipped-label detection at the end of training (flips fitted), against cleanlab on 5-fold CV; also the
    per-example means over the run's ``evals`` evaluations (what the store keeps as ``loo_loss_mean``).

    Each method's cost is what it computes, in units of one training run: its training run plus its sensitivity
    pass (with the K-FAC fit), or cleanlab's five cross-validation trainings.
    """
    from cleanlab.rank import get_label_quality_scores

    rows = []
    base = digits(seed=seed)
    wd = 1e-4
    for frac, mode in settings:
        split = flip_labels(base, frac, mode, seed)
        data = (split.xtr, split.ytr)
        history: list[tuple[np.ndarray, np.ndarray, float]] = []  # per evaluation: LOO losses, losses, seconds
        every = max(1, epochs // evals)

        def evaluate(ep, model, opt, dt, history=history, data=data, every=every):
            if ep % every == 0 or ep == epochs:  # as the worker evaluates: every few epochs and at the end
                t = time.perf_counter()
                res = _ivon_pass(model, opt, data)
                history.append((res.loo_losses.numpy(), res.losses.numpy(), time.perf_counter() - t))

        model, opt, train_s = _timed_train("mlp", "ivon", split, epochs, seed, wd, evaluate)
        evals_s = len(history) * min(h[2] for h in history)  # at the fastest pass, as the epochs
        fl = split.flipped.numpy().astype(int)
        res_ivon, ivon_s = _timed(_ivon_pass, model, opt, data)
        res_kfac, kfac_s = _timed(_kfac_pass, model, data, prior_from_weight_decay(wd, split.n))
        cv_probs, cl_s = np.zeros((split.n, 10)), 0.0
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(split.xtr, split.ytr):
            sub = Split(split.xtr[tr], split.ytr[tr], split.xte, split.yte)
            m, _, fold_s = _timed_train("mlp", "ivon", sub, epochs, seed, wd)
            cl_s += fold_s
            with torch.no_grad():
                m.eval()
                cv_probs[te] = m(split.xtr[te]).softmax(-1).numpy()
        quality = get_label_quality_scores(split.ytr.numpy(), cv_probs)
        scores = {
            "sensitivity (IVON σ²)": (res_ivon.scores.numpy(), train_s + ivon_s),
            "LOO self-confidence (IVON σ²)": (-res_ivon.loo_probs.numpy(), train_s + ivon_s),
            "sensitivity (K-FAC)": (res_kfac.scores.numpy(), train_s + kfac_s),
            "LOO self-confidence (K-FAC)": (-res_kfac.loo_probs.numpy(), train_s + kfac_s),
            "training loss": (res_ivon.losses.numpy(), train_s),
            "mean LOO loss over evaluations (IVON σ²)": (np.mean([h[0] for h in history], 0), train_s + evals_s),
            "mean training loss over evaluations": (np.mean([h[1] for h in history], 0), train_s + evals_s),
            "cleanlab, 5-fold CV": (-quality, cl_s),
        }
        for name, (score, cost_s) in scores.items():
            auroc, prec = _auroc_prec(fl, score)
            rows.append({"fraction": frac, "mode": mode, "method": name, "auroc": auroc, "precision": prec,
                         "cost": cost_s / train_s})
    return rows


BC_SELECTION = "mlp_tanh, breast cancer"


def model_selection(decays=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1), seed: int = 0,
                    epochs: int = 100) -> dict:
    """E2b: across weight decays, LOO at the end of training vs test NLL; does argmin LOO pick the right decay?
    On digits (logistic regression, the tanh MLP) and on breast cancer (the tanh MLP: the second data set)."""
    from research import setups

    out = {}
    for label, kind, dataset, n_train in (("logreg", "logreg", "digits", 1200), ("mlp_tanh", "mlp_tanh", "digits", 300),
                                          (BC_SELECTION, "mlp_tanh", "breast_cancer", 200)):
        split = (digits if dataset == "digits" else breast_cancer)(n_train, seed, torch.float64)
        rows = []
        for wd in decays:
            if dataset == "digits":
                model = make_model(kind, seed, torch.float64, hidden=32)
            else:  # as _train_small builds it
                torch.manual_seed(seed)
                model = setups.mlp(split.xtr.shape[1], int(split.ytr.max()) + 1, (32,), activation="tanh").double()
            prior = prior_from_weight_decay(wd, split.n)
            fit_map(model, split.xtr, split.ytr, prior_precision=prior, max_iter=1000)
            data = (split.xtr, split.ytr)
            row = {"weight_decay": wd, "test_nll": test_nll(model, split)}
            for cname, cov in (("dense", DenseCovariance.laplace(model, data, prior_precision=prior)),
                               ("kfac", KFACCovariance.fit(model, data, prior_precision=prior, mc_samples=None))):
                row[f"loo_{cname}"] = compute_sensitivities(model, data, cov).loo  # form "auto"
            if kind == "mlp_tanh":  # the library default: IVON with matched β2, its LOO (form "auto") at the mean
                cfg = {"opt": "ivon", "beta2": matched_beta2(epochs * ((split.n + 31) // 32))}
                m, o, _ = _train_small(cfg, split, epochs, seed, wd, 32, lambda *a: None)
                row["test_nll_default"] = test_nll(m, split)
                row["loo_default"] = compute_sensitivities(m, data, ivon_variance(o, m)).loo
                row["loo_last_layer"] = compute_sensitivities(
                    m, data, DenseCovariance.last_layer(m, data, prior_precision=prior)).loo  # form "auto": corrected
            rows.append(row)
        test = np.array([r["test_nll"] for r in rows])
        summ = {}
        if kind == "mlp_tanh":
            test_d = np.array([r["test_nll_default"] for r in rows])
            for est, key in (("default (IVON, matched β2)", "loo_default"),
                             ("last layer (IVON run, corrected)", "loo_last_layer")):
                loo = np.array([r[key] for r in rows])
                summ[est] = {
                    "pearson": float(pearsonr(loo, test_d)[0]), "picked": decays[int(loo.argmin())],
                    "best": decays[int(test_d.argmin())], "steps_off": abs(int(loo.argmin()) - int(test_d.argmin()))}
        for cname in ("dense", "kfac"):
            loo = np.array([r[f"loo_{cname}"] for r in rows])
            summ[cname] = {"pearson": float(pearsonr(loo, test)[0]),
                           "picked": decays[int(loo.argmin())], "best": decays[int(test.argmin())],
                           "steps_off": abs(int(loo.argmin()) - int(test.argmin()))}
        out[label] = {"rows": rows, "summary": summ, "n": split.n}
    return out

