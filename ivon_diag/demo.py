"""``ivon-diag demo`` in the terminal: IVON on digits with flipped labels, the diagnostics printed as it trains.

It shows the LOO estimate (calibrated as a job's is, on 5% of the training set held out, whose labels are flipped
alike) beside the test NLL (clean labels; the product never needs it) and how many flipped labels sit among
the most sensitive examples and among those with the highest LOO loss averaged over the evaluations so far (what the
store keeps as ``loo_loss_mean``: it holds up once the model has memorized the flips).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ivon_core import IVON, matched_beta2, nll, predict
from sensitivity import compute_sensitivities, ivon_variance
from worker.calibration import Calibration, heldout_nll, variance_level
from worker.config import CalibrationConfig, DataConfig, LabelNoiseConfig
from worker.data import inject_label_noise, load_dataset
from worker.models import mlp


def run_demo(epochs: int = 40, flip_fraction: float = 0.1, seed: int = 0, eval_every: int = 5,
             batch: int = 64, out=print) -> list[dict]:
    if not 0 <= flip_fraction < 1:
        raise ValueError(f"Invalid flip fraction: {flip_fraction!r} (must be in [0, 1))")
    if epochs < 1:
        raise ValueError(f"Invalid epochs: {epochs!r} (must be >= 1)")
    data = inject_label_noise(load_dataset(DataConfig(name="digits"), seed),
                              LabelNoiseConfig(fraction=flip_fraction, seed=seed))
    # as a job does by default: 5% held out of training, the LOO read at the scale that matches their NLL
    cal = Calibration(CalibrationConfig(), data.ytr.numpy(), 1, seed=seed + 4)
    kept = torch.from_numpy(cal.trained(data.n))
    x, y, flipped = data.xtr[kept], data.ytr[kept], data.flipped[kept]
    n = len(kept)
    torch.manual_seed(seed)
    model = mlp(64, 10, (128,))
    steps = epochs * ((n + batch - 1) // batch)
    opt = IVON(model.parameters(), lr=0.5, ess=n, hess_init=0.3, weight_decay=1e-3, beta2=matched_beta2(steps))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    n_flip = int(flipped.sum())
    out(f"digits: {n} training examples ({len(cal.held)} more held out to calibrate the LOO), {n_flip} labels "
        f"flipped; MLP 64-128-10 with IVON (β2 = {opt.param_groups[0]['beta2']:.5f}); LOO estimate: IVON σ² scaled "
        "to match the held-out NLL at each evaluation, the default deviation (Rayleigh form, capped at 2)")
    out(f"{'epoch':>5} {'train NLL':>10} {'LOO est.':>9} {'held-out':>9} {'test NLL':>9} {'test acc':>9} "
        f"{'flipped in top-' + str(n_flip):>18} {'by mean LOO loss':>17} {'eval s':>7}")
    history = []
    loo_sum = torch.zeros(n, dtype=torch.float64)
    for ep in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(batch):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
        if ep % eval_every and ep != epochs:
            continue
        t = time.perf_counter()
        var = ivon_variance(opt, model)
        res = compute_sensitivities(model, (x, y), var)
        held, _ = heldout_nll(model, data.xtr, data.ytr, torch.from_numpy(cal.held))
        res, _ = cal.update(res, lambda v: float(v.double().mean()), held, ep, variance_level(var))
        pred = predict(model, (data.xte, data.yte), opt, mc_samples=8)
        loo_sum += res.loo_losses.double()
        caught = float(flipped[res.top_k(n_flip)].float().mean()) if n_flip else float("nan")
        by_mean = float(flipped[torch.topk(loo_sum, n_flip).indices].float().mean()) if n_flip else float("nan")
        row = {"epoch": ep, "train_nll": float(res.losses.mean()), "loo": res.loo, "heldout_nll": held,
               "test_nll": nll(pred.mc, data.yte), "test_acc": float((pred.mc.argmax(1) == data.yte).float().mean()),
               "flipped_in_top": caught, "flipped_in_top_by_mean": by_mean, "eval_s": time.perf_counter() - t}
        history.append(row)
        out(f"{ep:5d} {row['train_nll']:10.3f} {row['loo']:9.3f} {held:9.3f} {row['test_nll']:9.3f} "
            f"{row['test_acc']:9.3f} {caught:18.2f} {by_mean:17.2f} {row['eval_s']:7.2f}")
    return history


def serve_demo(db: str, epochs: int = 40, flip_fraction: float = 0.1, seed: int = 0, port: int = 8000,
               host: str = "127.0.0.1") -> int:
    """Migrate the database, queue a digits job with flipped labels, start a worker and the dashboard."""
    import subprocess
    import sys

    import uvicorn

    from app.main import create_app
    from app.settings import Settings
    from app.store import Store, make_engine, upgrade
    from ivon_diag.serve import bind

    if not 0 <= flip_fraction < 1:
        raise ValueError(f"Invalid flip fraction: {flip_fraction!r} (must be in [0, 1))")
    sock = bind(host, port)  # bound before anything is queued: a busy port leaves no run behind
    engine = make_engine(db)
    upgrade(engine)
    store = Store(engine)
    config = {"name": f"digits, {flip_fraction:.0%} labels flipped", "data": {"name": "digits"},
              "model": {"name": "mlp", "hidden": [128]}, "epochs": epochs, "eval_every": 45,
              "label_noise": {"fraction": flip_fraction, "seed": seed}, "seed": seed,
              "early_stopping": {"enabled": False}}
    run = store.create_run(config["name"], config)
    checkpoints = "checkpoints-demo"
    worker = subprocess.Popen([sys.executable, "-m", "ivon_diag.cli", "--db", db, "worker", "--checkpoint-dir",
                               checkpoints])
    print(f"dashboard: http://{host}:{port}/runs/{run.id}   (all runs: http://{host}:{port}/; Ctrl-C stops)",
          flush=True)
    try:
        app = create_app(Settings(db=db, checkpoint_dir=checkpoints), store)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    return 0
