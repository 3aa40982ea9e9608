"""When to evaluate and which examples to score, within a budget of training time.

Scoring every example costs about two epochs of arithmetic (a per-example gradient and a JVP each), so a job
cannot score all of them at every evaluation and stay near the cost of training. The ``Cadence`` instead:

- keeps a credit of ``budget`` × the training time so far, spends it on evaluations (scoring, test metrics,
  checkpoint) and plans the next evaluation for the step where the credit pays for it (the last step always
  evaluates: a job's final results; an evaluation after which the credit left at the end would not pay for the last
  one's slice is not made, so the last scores a full slice, freshly);
- scores a slice of a stratified random permutation of the examples at each evaluation (a *rotation*: every example
  once per cycle), so the slice is a stratified random sample whose mean LOO loss estimates the whole set's with a
  standard error (``worker.sampling.loo_estimate``), and running means over evaluations see every example; the first
  evaluation after the first epoch starts the cycle again, so the slices scored while the model was barely trained
  are scored again first;
- sizes the slice to the larger of what brings the standard error to ``se_target`` of the estimate and what
  completes a cycle every ``coverage_epochs`` epochs at the affordable cadence, but no larger than what still allows
  one evaluation every ``MAX_GAP_EPOCHS`` epochs.

Where the model allows it (``sensitivity.screen``: a Linear output layer, a diagonal Σ), evaluations also
*screen*: the output layer's share of the sensitivities, at about a forward's cost (``worker.sweeps``: when and how
many, while the screen ranks like the exact pass).

Costs are measured, not guessed: seconds per scored example and the fixed seconds of an evaluation, as running
averages of what the trainer reports. A fixed ``eval_every`` keeps its cadence; a budget then sizes the slices.
"""

from __future__ import annotations

import math

import numpy as np

from worker.sampling import blend, stratified_permutation
from worker.sweeps import ScreenPlan

FLOOR = 64  # the smallest slice worth an evaluation's fixed cost (and a usable standard error)
PILOT = 256  # the first slice, before the losses' spread is known
MAX_GAP_EPOCHS = 2.0  # slices no larger than what allows an evaluation this often
PLAN_AFTER = 10  # training steps timed before the first evaluation is planned
EXACT_LAST = 1.0  # the last evaluation scores every example where that costs at most this many of its fixed parts
# (and at most the budget so far)


class Cadence(ScreenPlan):
    """The budget's bookkeeping and the rotation of examples (see the module's docstring).

    ``labels``: the labels of the examples that may be scored (positions 0..n-1 index them); ``budget``: the
    evaluations' share of the training time (None: every example at every evaluation, at ``every`` steps);
    ``every``: a fixed cadence in steps (None: the budget decides); ``steps_per_epoch``: for coverage and the
    gap cap; ``test_labels`` and ``test_sample``: the test set's labels and the size of its fixed subset (``test_ids``)
    that the evaluations before the last measure; ``total_steps``: the job's last step, so that an evaluation that
    would starve the last one of its slice is not planned.
    """

    def __init__(self, labels: np.ndarray, budget: float | None, every: int | None, steps_per_epoch: int,
                 se_target: float = 0.02, coverage_epochs: float = 5.0, seed: int = 0,
                 test_labels: np.ndarray | None = None, test_sample: int = 1000, total_steps: int | None = None):
        if budget is None and every is None:
            raise ValueError("a cadence needs a budget or a fixed eval_every")
        self.labels = np.asarray(labels)
        self.n = len(self.labels)
        self.population = np.bincount(self.labels) if self.n else np.zeros(0, np.int64)
        self.budget, self.every, self.spe, self.total = budget, every, max(1, steps_per_epoch), total_steps
        self.se_target, self.coverage_epochs = se_target, coverage_epochs
        self.rng = np.random.default_rng(seed)
        test_labels = np.zeros(0, np.int64) if test_labels is None else np.asarray(test_labels)
        self.test_population = np.bincount(test_labels, minlength=len(self.population))
        # the test subset of the evaluations before the last: fixed, stratified (the last measures the whole set)
        self.test_ids = np.sort(stratified_permutation(test_labels, np.random.default_rng(seed + 1))[:test_sample])
        self.order = np.zeros(0, np.int64)  # this cycle's permutation, ``pos`` of it scored
        self.pos, self.cycles = 0, 0
        self.restarted = False  # whether the cycle has started again after the first epoch (``take``)
        self.train_s = 0.0  # training seconds so far (this process and before a resume)
        self.spent_s = 0.0  # evaluation seconds so far
        self.warmup_s = 0.0  # the processes' first-pass one-time costs: a debt the last slice pays (``warmed_up``)
        self.per_example = None  # seconds per scored example (running average)
        self.fixed = None  # seconds of an evaluation besides scoring
        self.cv = None  # the LOO losses' coefficient of variation at the last evaluation
        self.steps_trained = 0
        # screening (module docstring): its own rotation, the cost of a screened example, whether the last check held
        self._init_screen(seed + 2)
        self.next_step: int | None = None if every is None else every
        self.next_size = self.size()

    # ------------------------------------------------------------------------------ what to score
    def full(self) -> bool:
        return self.budget is None

    def size(self) -> int:
        """Examples to score at the next evaluation."""
        if self.full() or self.n == 0:
            return self.n
        floor = min(self.n, FLOOR)
        if self.per_example is None:
            return min(self.n, PILOT)
        c, f = self.per_example + self._check_cost(), self.fixed or 0.0  # the slice is screened too (a check)
        b = self.budget - self.screen_rate()  # what the exact slices may spend
        per_step = self.train_s / max(self.steps_trained, 1)
        if self.every is not None:  # a fixed cadence: what the budget pays for at it
            return int(min(self.n, max(floor, (b * self.every * per_step - f) / c)))
        n_se = self.n if self.cv is None else _sample_for(self.cv / self.se_target, self.n)
        epoch_s = per_step * self.spe
        rate = self.n / (self.coverage_epochs * max(epoch_s, 1e-9))  # examples per training second for coverage
        n_cov = 0.0 if self.screening() else rate * f / (b - rate * c) if b > rate * c else self.n
        n_gap = max((b * MAX_GAP_EPOCHS * epoch_s - f) / c, floor)  # the most that keeps evaluations that close
        return int(min(self.n, max(floor, min(max(n_se, n_cov), n_gap))))

    def last_size(self) -> int:
        """The last evaluation's slice: due whatever the credit, so its planned size as far as the credit left pays
        (at least FLOOR). Not more: a larger slice than the one timed costs more per example than the estimate (the
        ResNet's in bench/overhead.py); but every example where scoring them all costs no more than the evaluation's
        fixed part (test metrics, store: what a job evaluating once pays too) nor than the whole budget so far. Its
        sweep of every example, where the screen agrees, is beyond the budget (``worker.sweeps``)."""
        if self.full() or self.per_example is None:
            return self.next_size
        per = self.per_example + self._check_cost()
        if self.n * per <= min(EXACT_LAST * (self.fixed or 0.0), self.budget * self.train_s):
            return self.n  # small data sets: the final LOO exact, for milliseconds
        credit = self.budget * self.train_s - self.spent_s - self.warmup_s - (self.fixed or 0.0)
        return int(min(self.next_size, max(min(self.n, FLOOR), credit / per)))

    def take(self, k: int | None = None) -> np.ndarray:
        """The next ``k`` (default: the planned size) positions of the rotation, sorted (all of them when the job
        scores everything)."""
        k = self.next_size if k is None else k
        if self.full() or k >= self.n:
            return np.arange(self.n)
        if not self.restarted and self.steps_trained >= self.spe:
            # the slices scored during the first epoch scored a model that has changed most since (their scores rank
            # the trained model's examples barely better than chance): the cycle starts again from them
            self.restarted, self.pos = True, 0
        out = self.order[self.pos : self.pos + k]
        self.pos += len(out)
        if len(out) < k:  # the cycle ends: a new permutation, the just-taken ones moved to its end
            self.cycles += 1
            fresh = stratified_permutation(self.labels, self.rng)
            taken = np.isin(fresh, out)
            self.order = np.concatenate([fresh[~taken], fresh[taken]])
            more = self.order[: k - len(out)]
            self.pos = len(more)
            out = np.concatenate([out, more])
        return np.sort(out)

    # ------------------------------------------------------------------------------ when
    def cost(self, k: int) -> float:
        if self.per_example is None:  # the pilot: a scored example ~ 1.5 of training's (bench/overhead.py), a test
            # example's forward ~ 1/3
            train_example = self.train_s / max(self.steps_trained, 1) / max(self.n / self.spe, 1.0)
            return train_example * (1.5 * k + len(self.test_ids) / 3)
        return (self.fixed or 0.0) + (self.per_example + self._check_cost()) * k

    def plan(self, step: int) -> dict:
        """The next evaluation's step and size, decided from this process's measurements (under torchrun: rank 0's,
        sent to every rank with ``apply``)."""
        size = self.size()
        if self.every is not None:
            nxt = (step // self.every + 1) * self.every
            return {"step": nxt, "size": size, "sweep": self.sweep_size(self._capped(nxt))}
        per_step = self.train_s / max(self.steps_trained, 1)
        b = self.budget - self.screen_rate()  # the screen's share is spent as it goes (``screen_checked``)
        cost = self.cost(size)  # credit saved up pays at most half of it: evaluations do not bunch up
        credit = self.budget * self.train_s - self.spent_s - self.screen_rate() * per_step * (step - self.screened_to)
        need = max(cost - credit, cost / 2)
        nxt = step + max(1, math.ceil(need / max(b * per_step, 1e-12)))
        if self.total is not None and nxt < self.total and self.per_example is not None:
            # the last evaluation (due whatever the credit) is the run's result: where the credit left at the end
            # would not pay for its slice after this one, this one is skipped and the last has it all
            left = b * per_step * (self.total - step) + credit - cost
            if left < self.cost(size):
                nxt = self.total
        return {"step": nxt, "size": size, "sweep": self.sweep_size(self._capped(nxt))}

    def _capped(self, step: int) -> int:
        return step if self.total is None else min(step, self.total)

    def apply(self, plan: dict) -> None:
        self.next_step, self.next_size = int(plan["step"]), int(plan["size"])
        self.next_sweep = int(plan.get("sweep", 0))

    def due(self, step: int, last: bool) -> bool:
        """Whether to evaluate after ``step``; the last step always is."""
        return last or (self.next_step is not None and step >= self.next_step)

    def needs_plan(self, step: int) -> bool:
        """Before the first evaluation: plan once a few steps have been timed."""
        return self.next_step is None and step >= min(PLAN_AFTER, self.spe)

    # ------------------------------------------------------------------------------ measurements
    def trained(self, seconds: float, steps: int = 1) -> None:
        self.train_s += seconds
        self.steps_trained += steps

    def warmed_up(self, seconds: float) -> None:
        """A process's one-time costs of its first pass. Charged to the last evaluation's slice, not to the ones
        along the way: on a job of a few seconds' training it would otherwise spend the credit of every evaluation
        before the last (a 6,000-row CSV job, 15 epochs: 2 evaluations)."""
        self.warmup_s += seconds

    def evaluated(self, scoring_s: float, other_s: float, scored: int, estimate: float | None = None,
                  se: float | None = None) -> None:
        """Record an evaluation's seconds and its estimate's relative spread (for the next slice's size)."""
        self.spent_s += scoring_s + other_s
        if scored:
            self.per_example = blend(self.per_example, scoring_s / scored)
        self.fixed = blend(self.fixed, other_s)
        if se is not None and estimate and 1 < scored < self.n and math.isfinite(se):
            # the spread of one example (se = sd × sqrt(fpc / n)), relative to the estimate
            self.cv = float(se / abs(estimate) * math.sqrt(scored / (1 - scored / self.n)))

    def coverage_period(self) -> float | None:
        """Evaluations per full cycle at the current slice size (None when every example is scored each time)."""
        return None if self.full() else self.n / max(self.size(), 1)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order.tolist(), "pos": self.pos,
                "cycles": self.cycles, "train_s": self.train_s, "spent_s": self.spent_s, "warmup_s": self.warmup_s,
                "per_example": self.per_example, "fixed": self.fixed, "cv": self.cv,
                "steps_trained": self.steps_trained, "next_step": self.next_step, "next_size": self.next_size,
                "restarted": self.restarted, **self._screen_state()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        for key in ("pos", "cycles", "train_s", "spent_s", "per_example", "fixed", "cv", "steps_trained", "next_step",
                    "next_size"):
            setattr(self, key, state[key])
        self.order = np.asarray(state["order"], dtype=np.int64)
        self.restarted = state.get("restarted", self.steps_trained >= self.spe)  # older checkpoints: past it
        self.warmup_s = state.get("warmup_s", 0.0)  # older checkpoints: in spent_s
        self._load_screen_state(state)


def _sample_for(cv_over_target: float, n: int) -> float:
    """The simple random sample size whose standard error is the target (cv / target = sd / (target × mean)),
    with the finite-population correction."""
    n0 = cv_over_target ** 2
    return n0 / (1 + n0 / n)
