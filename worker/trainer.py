"""One training job: IVON steps, evaluations (sensitivities, LOO, metrics) written to the store, early stopping,
checkpoints at every evaluation so that a killed job resumes to the same final weights."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from app.store import Store
from app.store.job_config import diagnostics_budget, eval_steps
from ivon_core import IVON, all_metrics, matched_beta2, mean_probs, predict, preserved_noise
from sensitivity import compute_sensitivities
from sensitivity.covariance import KFACCovariance
from sensitivity.deviations import CAPPED_FORMS
from sensitivity.variance import as_covariance, default_form
from worker import distributed as D
from worker import job_state, models, screening
from worker.cadence import Cadence
from worker.calibration import Calibration, heldout_nll, variance_level
from worker.checkpoints import CheckpointMismatch, Checkpoints
from worker.config import JobConfig
from worker.covariances import job_variance, optimizer_variance
from worker.data import Dataset, Rows, Thumbnails, inject_label_noise, load_dataset
from worker.early_stopping import EarlyStopping
from worker.hooks import HookDispatcher
from worker.progress import StepBar
from worker.sampling import loo_estimate, take_all
from worker.step import train_step


class JobFailed(RuntimeError):
    """The job cannot go on (non-finite loss, bad data, …); the message is stored on the run."""


def build_model(cfg: JobConfig, data: Dataset) -> nn.Module:
    if data.model is not None:  # a factory's own
        return data.model
    m, k = cfg.model, data.num_classes
    in_features = int(torch.tensor(data.xtr.shape[1:]).prod())
    if m.name == "logreg":
        return models.logistic_regression(in_features, k)
    if m.name == "mlp":
        return models.mlp(in_features, k, tuple(m.hidden))
    if data.image_shape is None:
        raise JobFailed(f"model {m.name!r} needs image data; data set {cfg.data.name!r} is not images")
    c, side = data.image_shape[0], data.image_shape[1]
    if m.name == "cnn":
        return models.small_cnn(c, k, side)
    return models.resnet20(k, c, m.norm)


class Trainer:
    def __init__(self, cfg: JobConfig, store: Store, run_id: int, checkpoint_dir: str | Path, run_uid: str,
                 should_stop: Callable[[], bool] = lambda: False, log: Callable[[str], None] = print,
                 hooks: HookDispatcher | None = None, progress: bool = False):
        self.cfg, self.store, self.run_id = cfg, store, run_id
        self.hooks = hooks or HookDispatcher()
        self.checkpoints = Checkpoints(checkpoint_dir, run_uid, cfg.model_dump(mode="json"))
        self.should_stop, self.log = should_stop, log
        self.progress, self.bar = progress, StepBar(False, 0, 0, "")
        self.writer = D.rank() == 0  # under torchrun, rank 0 alone writes the store, checkpoints and hooks
        self._above = False  # the last evaluation's training NLL was past the divergence threshold
        self._warm = False  # a sensitivity pass has run in this process
        self._no_screen: str | None = None  # why this job does not screen (worker.screening)

    def _setup(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        try:
            data = inject_label_noise(load_dataset(cfg.data, cfg.seed), cfg.label_noise)
        except (ValueError, FileNotFoundError) as err:
            raise JobFailed(str(err)) from None
        try:
            self.device = D.resolve_device(cfg.device)
        except ValueError as err:
            raise JobFailed(str(err)) from None
        model = build_model(cfg, data).to(self.device)
        data = data.to(self.device)
        if cfg.sensitivity.covariance == "kfac":  # refuse before training, not at the first evaluation
            try:
                KFACCovariance.check(model)
            except ValueError as err:
                raise JobFailed(str(err)) from None
        cal = Calibration(cfg.calibration, data.ytr.cpu().numpy(), 0, seed=cfg.seed + 4)
        self.trained = torch.from_numpy(cal.trained(data.n))  # all but the calibration split
        spe = math.ceil(len(self.trained) / cfg.batch_size)
        total = cfg.epochs * spe
        cal.total = total
        self.cal = cal
        o = cfg.optimizer
        if o.name == "ivon":
            beta2 = matched_beta2(total) if o.beta2 == "matched" else float(o.beta2)
            opt = IVON(model.parameters(), lr=o.lr, ess=o.ess or len(self.trained), hess_init=o.hess_init, beta2=beta2,
                       weight_decay=o.weight_decay, mc_samples=o.mc_samples,
                       clip_radius=o.clip_radius or float("inf"), sync=D.active(), fused=o.fused,
                       noise=o.noise)
        elif o.name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=0.9, weight_decay=o.weight_decay)

        def schedule(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            frac = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return data, model, opt, sched, spe, total

    def run(self) -> str:
        """Train to the end, an early stop or a stop request; returns "done", "stopped" or "released"."""
        try:
            return self._run()
        finally:
            self.bar.close()

    def _run(self) -> str:
        cfg = self.cfg
        try:
            data, model, opt, sched, spe, total = self._setup()
            failure = None
        except JobFailed as err:
            failure = str(err)
        failures = D.all_gather(failure)  # every rank learns if one could not start (its data, say)
        if any(failures):
            rank, reason = next((r, f) for r, f in enumerate(failures) if f)
            raise JobFailed(reason if len(failures) == 1 else f"rank {rank}: {reason}")
        es = EarlyStopping(**cfg.early_stopping.model_dump(exclude={"enabled"}))
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        trained = self.trained
        pool = trained  # the examples evaluations may score
        if cfg.sensitivity.subset and cfg.sensitivity.subset < len(trained):
            pick = torch.randperm(len(trained), generator=torch.Generator().manual_seed(cfg.seed + 2))
            pool = trained[pick[:cfg.sensitivity.subset]]
        d = cfg.diagnostics
        cad = Cadence(data.ytr[pool].cpu().numpy(), diagnostics_budget(cfg), eval_steps(cfg.eval_every, spe), spe,
                      d.se_target, d.coverage_epochs, seed=cfg.seed + 3, test_labels=data.yte.cpu().numpy(),
                      test_sample=d.test_sample, total_steps=total)
        seen = torch.full((data.n,), float("nan"), device=data.ytr.device)
        step, perm = 0, None
        if self.checkpoints.has_resume():
            step, perm = self._resume(model, opt, sched, gen, es, cad, seen)
        elif self.writer:
            self.store.add_examples(self.run_id, list(range(data.n)), data.ytr.tolist(), data.flipped.tolist(),
                                    data.original.tolist(), Thumbnails(data), sources=data.refs,
                                    class_names=data.class_names, features=data.features,
                                    feature_names=data.feature_names)
            self.store.add_test_examples(self.run_id, data.yte.tolist(), Thumbnails(data, test=True))
        if self.writer and not self.cal.active:
            self.log(f"run {self.run_id}: LOO {self.cal.note}")
        self.bar = StepBar(self.progress and self.writer, total, step, f"run {self.run_id}")
        status = "done"
        mark, marked = time.perf_counter(), step  # training time is wall time between evaluations
        while step < total:
            pos = step % spe
            if pos == 0 or perm is None:
                perm = trained[torch.randperm(len(trained), generator=gen)]
            idx = perm[pos * cfg.batch_size : (pos + 1) * cfg.batch_size]
            if len(idx) >= D.world():  # this rank's share (a last batch smaller than the world goes to all)
                idx = D.shard(idx)
            loss, per = train_step(model, opt, data.xtr[idx], data.ytr[idx], self.cfg.micro_batches)
            seen[idx.to(seen.device)] = per.float()  # each example's latest training loss: the LOO's control variate
            loss = D.mean(loss)
            if not math.isfinite(loss):
                raise JobFailed(f"non-finite training loss ({loss}) at step {step + 1}")
            sched.step()
            step += 1
            self.bar.update()
            if cad.needs_plan(step):  # the first evaluation, once some steps are timed
                cad.trained(time.perf_counter() - mark, step - marked)
                mark, marked = time.perf_counter(), step
                cad.apply(D.broadcast(cad.plan(step) if self.writer else None))
            if not cad.due(step, step == total):
                continue
            cad.trained(time.perf_counter() - mark, step - marked)
            with preserved_noise(opt) if isinstance(opt, IVON) else contextlib.nullcontext():
                decision = D.broadcast(self._evaluate_and_decide(model, opt, data, pool, cad, seen, step, spe, es,
                                                                     step == total))
            if decision["fail"]:
                raise JobFailed(decision["fail"])
            cad.apply(decision["plan"])
            if decision["stop"]:
                if es.restore_best_weights and self.writer:
                    es.restore(model)
                status = "stopped"
                break
            saving = time.perf_counter()
            self._checkpoint(model, opt, sched, gen, step, perm, es, cad, seen)
            cad.spent_s += time.perf_counter() - saving  # the next checkpoint carries it
            mark, marked = time.perf_counter(), step
            if decision["release"]:
                return "released"
        if self.writer:  # with the optimizer's σ² at the end, for influence queries (worker.influence)
            self.checkpoints.save_model(self._posterior(model, opt, data, step))
            self.hooks.emit("finished", {"run_id": self.run_id, "step": step, "status": status})
        return status

    def _posterior(self, model, opt, data: Dataset, step: int) -> dict:
        """The weights, the optimizer's σ² (IVON, AdamW; SGD's is refitted when queried) and the LOO's scale."""
        state = {"model": model.state_dict(), "step": step, "calibration_scale": self.cal.last}
        if isinstance(opt, (IVON, torch.optim.AdamW)):
            state["variance"] = {n: v.detach().cpu() for n, v in
                                 optimizer_variance(self.cfg, model, opt, data, self.trained).items()}
        return state

    def _evaluate_and_decide(self, model, opt, data, pool, cad, seen, step, spe, es, last) -> dict | None:
        """Every rank evaluates its shard; rank 0 writes and returns what all ranks do next (None elsewhere): whether
        to stop, and the next evaluation's step and size (the cadence's plan)."""
        decision = {"fail": None, "stop": False, "release": False, "plan": None}
        try:
            metrics = self._evaluate(model, opt, data, pool, cad, seen, step, spe, last)
            if not self.writer:
                return None
            decision["plan"] = cad.plan(step)
            cfg = self.cfg
            if cfg.early_stopping.enabled and es.step(metrics, step, model):
                self.store.save_early_stop(self.run_id, monitor=es.monitor, mode=es.mode, best=es.best,
                                           best_step=es.best_step, wait=es.wait, stopped_step=es.stopped_step,
                                           reason=es.reason)
                if es.reason and "not finite" in es.reason:
                    raise JobFailed(es.reason)
                self.log(f"run {self.run_id}: early stop at step {step}: {es.reason}")
                self.hooks.emit("early_stop", {"run_id": self.run_id, "step": step, "reason": es.reason,
                                               "best": es.best, "best_step": es.best_step})
                decision["stop"] = True
                return decision
            if cfg.early_stopping.enabled:
                self.store.save_early_stop(self.run_id, monitor=es.monitor, mode=es.mode, best=es.best,
                                           best_step=es.best_step, wait=es.wait)
            decision["release"] = bool(self.should_stop())
            return decision
        except Exception as err:
            if D.active() and self.writer:  # tell the other ranks before failing, or they wait for ever
                D.broadcast({**decision, "fail": f"{type(err).__name__}: {err}"})
            raise

    def _resume(self, model, opt, sched, gen, es, cad, seen) -> tuple[int, torch.Tensor | None]:
        try:
            ck = self.checkpoints.load_resume()  # on the CPU: a GPU run can resume on a CPU
        except CheckpointMismatch as err:
            raise JobFailed(str(err)) from None
        job_state.restore(ck, self.device, model, opt, sched, gen, es, cad, seen, self.cal)
        self.log(f"run {self.run_id}: resumed at step {ck['step']}")
        return ck["step"], ck["perm"]

    def _variance(self, model, opt, data: Dataset):
        return job_variance(self.cfg, model, data, optimizer_variance(self.cfg, model, opt, data, self.trained),
                            self.trained)

    def _evaluate(self, model, opt, data: Dataset, pool, cad: Cadence, seen, step: int, spe: int,
                  last: bool) -> dict[str, float] | None:
        t = time.perf_counter()
        seen = D.merge_filled(seen)  # rank 0: every rank's latest training losses
        # the last size from rank 0's costs (each rank times its own): every rank takes the same slice
        size = D.broadcast(cad.last_size() if self.writer else None) if last else cad.next_size
        top = take_all(None if seen is None else seen[pool.to(seen.device)].cpu().numpy(), size)
        certain = pool[torch.from_numpy(D.broadcast(top))]  # rank 0's: it holds every rank's training losses
        rotation = pool[torch.from_numpy(cad.take(size - len(certain)))]  # the same slice on every rank
        chosen = torch.unique(torch.cat([rotation, certain])) if len(certain) else rotation
        ids = D.shard(chosen)  # under torchrun, this rank's examples
        variance = self._variance(model, opt, data)
        form = self.cal.form(self.cfg.sensitivity.form, default_form(as_covariance(model, variance)),
                             self.cfg.early_stopping.monitor)

        def score(ids):
            return compute_sensitivities(model, Rows(data.xtr, data.ytr, ids, self.cfg.sensitivity.chunk_size),
                                         variance, form=form, chunk_size=self.cfg.sensitivity.chunk_size,
                                         max_amplification=self.cfg.sensitivity.max_amplification)

        if not self._warm and not cad.full():  # the process's first pass pays one-time costs: kept out of the costs
            score(ids[:2])  # the cadence plans with (a debt the last slice pays: ``Cadence.warmed_up``)
            self._warm = True
            t_scoring = time.perf_counter()
        else:
            t_scoring = t
        res = D.gather_result(score(ids))
        scoring = time.perf_counter() - t_scoring
        scr = self._screen(model, data, variance, form, ids, res, pool, cad, step, last)  # every rank
        if res is None:  # not rank 0: its shards were sent there
            return None
        metrics: dict[str, float] = {}
        # with a budget, evaluations before the last one measure the test metrics at the mean on a fixed stratified
        # subset (cad.test_ids: the curve moves with the model, not with the sample) and skip the MC predictive
        # (eval_mc_samples passes; at each evaluation when early stopping monitors it)
        whole = cad.full() or last
        tids = slice(None) if whole else torch.from_numpy(cad.test_ids).to(data.yte.device)
        xte, yte = data.xte[tids], data.yte[tids]
        mc = isinstance(opt, IVON) and (whole or self.cfg.early_stopping.monitor.startswith("test_mc_"))
        pred = predict(model, xte, opt, mc_samples=self.cfg.eval_mc_samples) if mc else None
        test_mean = mean_probs(model, xte) if pred is None else pred.mean.to(yte.device)
        metrics.update({f"test_{k}": v for k, v in all_metrics(test_mean, yte).items()})
        if not whole:
            losses = -test_mean.gather(1, yte[:, None]).clamp_min(1e-12).log().squeeze(1).double().cpu().numpy()
            metrics["test_nll_se"] = loo_estimate(losses, yte.cpu().numpy(), cad.test_population)[1]
        if whole:
            self.store.write_test_predictions(self.run_id, step, test_mean.cpu().numpy())
        if pred is not None:
            metrics.update({f"test_mc_{k}": v for k, v in all_metrics(pred.mc.to(yte.device), yte).items()})
        if isinstance(opt, IVON):
            hs = torch.cat([opt.state[p]["hess"].flatten() for p in model.parameters() if p in opt.state])
            metrics.update({"hess_mean": float(hs.mean()), "hess_min": float(hs.min()), "hess_max": float(hs.max())})
            # near 1: the LOO's scale is hess_init's, not learned from the data (docs/validation.md)
            metrics["hess_init_share"] = opt.hess_init_share()
        # the pool's mean LOO loss from the scored slice (a stratified sample; the whole pool: standard error 0)
        in_top = torch.isin(res.indices, certain.cpu()).numpy()
        rest = pool[~torch.isin(pool, certain)] if len(certain) else pool
        # the control variate: the screen's LOO losses where it covered every example, else the training losses
        control = scr.control(res.indices.numpy(), rest.cpu().numpy()) or \
            (seen[res.indices.to(seen.device)].cpu().numpy(), seen[rest.to(seen.device)].cpu().numpy())

        def estimate(losses):
            return loo_estimate(losses.numpy(), res.targets.cpu().numpy(), cad.population, control=control,
                                certain=in_top)

        # the training set's loss and accuracy at the mean, estimated as the LOO is: a slice's take-all stratum holds
        # the largest training losses, so its plain mean would not be the set's
        metrics = {"train_nll": max(estimate(res.losses.double())[0], 0.0),
                   "train_acc": min(max(estimate((res.logits.argmax(1) == res.targets).double())[0], 0.0), 1.0),
                   **metrics}
        res, cal = self._calibrate(model, data, res, lambda losses: estimate(losses)[0], metrics, variance, step,
                                   len(yte))
        metrics.update(cal)
        metrics.update(scr.metrics)
        if res.form in CAPPED_FORMS:  # share of examples whose correction hit max_amplification
            metrics["loo_capped"] = res.capped
        metrics["loo"], metrics["loo_se"] = estimate(res.loo_losses)
        metrics["loo_sample"] = float(len(res.indices))
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise JobFailed(f"non-finite {', '.join(bad)} at step {step}")
        self._check_divergence(metrics["train_nll"], data.num_classes, step)
        loo = metrics.pop("loo")
        self.store.write_evaluation(self.run_id, step, loo=loo, metrics=metrics, **scr.rows(res), epoch=step / spe,
                                    wall_time=time.perf_counter() - t, carry=not cad.full(),
                                    scores_scale=res.form == "first_order" and self.cal.active)
        if self.cfg.sensitivity.keep_states:  # for influence queries at this step
            self.checkpoints.save_evaluation(step, self._posterior(model, opt, data, step),
                                             self.cfg.sensitivity.keep_states)
        cad.evaluated(scoring, time.perf_counter() - t_scoring - scoring - scr.seconds, len(res.indices), loo,
                      metrics["loo_se"])
        if scr.count:
            cad.screen_checked(scr.agrees, scr.seconds, scr.count)
        cad.warmed_up(t_scoring - t)
        self.hooks.emit("evaluation", {"run_id": self.run_id, "step": step, "loo": loo, "metrics": metrics})
        msg = (f"run {self.run_id} step {step}: loo {loo:.4f} train_nll {metrics['train_nll']:.4f} "
               f"test_nll {metrics['test_nll']:.4f}")
        if getattr(self.log, "structured", False):
            self.log(msg, event="evaluation", run=self.run_id, step=step, epoch=round(step / spe, 4), loo=loo,
                     seconds=round(time.perf_counter() - t, 3), **metrics)
        else:
            self.log(msg)
        self.bar.show(loo=loo, test_nll=metrics["test_nll"])
        return {**metrics, "loo": loo}

    def _screen(self, model, data, variance, form, ids, res, pool, cad, step, last):
        """The screen's check on the slice and, where it holds, its sweep (worker.screening; every rank screens its
        share, rank 0 gets the ``Screened``)."""
        d = self.cfg.diagnostics
        if cad.full() or not d.screen or self._no_screen:
            return screening.Screened()
        self._no_screen = screening.available(model, variance)  # the same on every rank
        if self._no_screen:
            if self.writer:
                self.log(f"run {self.run_id}: not screening ({self._no_screen}): the exact rotation covers the "
                         "examples")
            return screening.Screened()
        sweep = None
        if self.writer:
            k = cad.sweep_now(last)
            sweep = pool[torch.from_numpy(cad.take_screen(k, step))] if k else pool[:0]
        return screening.run(model, data, variance, form, ids, res, sweep, min_spearman=d.screen_min_spearman,
                             chunk=self.cfg.sensitivity.chunk_size,
                             max_amplification=self.cfg.sensitivity.max_amplification)

    def _calibrate(self, model, data: Dataset, res, estimate, metrics, variance, step, n_test):
        """(the result at the calibrated scale, the calibration's metrics): worker.calibration."""
        cal = self.cal
        if not cal.active or cal.fixed:
            return cal.update(res, estimate, None, step, None)
        if cal.cfg.source == "test":  # the test metrics just measured (a stratified subset with a budget)
            target, se, n = metrics["test_nll"], metrics.get("test_nll_se"), n_test
        else:
            target, se = heldout_nll(model, data.xtr, data.ytr, torch.from_numpy(cal.held))
            n = len(cal.held)
        res, out = cal.update(res, estimate, target, step, variance_level(variance))
        out.update({"calibration_nll": target, "calibration_examples": float(n)})
        if se is not None and math.isfinite(se):
            out["calibration_nll_se"] = se
        return res, out

    # a training NLL this many times chance's (log K) at two evaluations in a row: diverged (a large learning rate's
    # first steps can pass a hundred times chance and recover; no run that learns stays past a thousand)
    DIVERGED = 1000.0

    def _check_divergence(self, train_nll: float, num_classes: int, step: int) -> None:
        chance = math.log(max(num_classes, 2))
        above, self._above = self._above, train_nll > self.DIVERGED * chance
        if above and self._above:
            raise JobFailed(f"training diverged: training NLL {train_nll:.4g} at step {step}, "
                            f"{train_nll / chance:.3g} times that of a uniform guess; standardize the features "
                            "(data.standardize: true) or lower optimizer.lr")

    def _checkpoint(self, model, opt, sched, gen, step, perm, es, cad, seen) -> None:
        state = job_state.capture(self.device, model, opt, sched, gen, step, perm, es, cad, seen, self.cal)
        if self.writer:
            self.checkpoints.save_resume(state)
