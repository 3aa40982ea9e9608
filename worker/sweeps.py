"""The screen's part of an evaluation plan (``worker.cadence``): when evaluations sweep examples with the output
layer's share of the sensitivities (``sensitivity.screen``), how many, and in which order.

Screened scores are used only while they rank like the exact pass on the evaluation's own slice (the trainer checks
it each time: ``worker.screening``). Where they do, the last evaluation screens every example it does not score, a
forward each, beyond the budget (about a third of an epoch's arithmetic, at most FINAL_EPOCHS of training time: the
run's final rankings then cover every example); and where a second rotation that screens every example each
``coverage_epochs`` epochs costs at most SCREEN_SHARE of the budget, evaluations along the way sweep it and the exact
slices are sized for the standard error alone. A screened example's cost is measured once a sweep of SCREEN_TIMED
examples has run.
"""

from __future__ import annotations

import math

import numpy as np

from worker.sampling import blend, stratified_permutation

SCREEN_SHARE = 0.35  # sweeps for coverage take at most this share of the budget; beyond it the exact rotation covers
SCREEN_MARGIN = 1.05  # screen a little more than coverage needs: a cycle ends within the period, not at its end
SCREEN_TIMED = 1024  # screens of fewer examples are mostly per-call costs: until one this large is timed, a screened
SCREEN_GUESS = 0.35  # example is taken to cost this share of a trained one (a forward; bench/overhead.py measures it)
FINAL_EPOCHS = 0.5  # the last sweep, beyond the budget, costs at most this many epochs' training time (a forward
# each: about a third of a training step's arithmetic, so every example)
STATE = ("screen_pos", "per_screened", "screen_ok", "checked", "screened_to", "next_sweep")


class ScreenPlan:
    """The screening half of ``Cadence`` (a mixin: it reads the cadence's budget, measurements and labels)."""

    def _init_screen(self, seed: int) -> None:
        self.screen_rng = np.random.default_rng(seed)
        self.screen_order, self.screen_pos = np.zeros(0, np.int64), 0
        self.per_screened: float | None = None
        self.screen_ok = self.checked = False
        self.screened_to = 0  # the step the screen's rotation has covered up to
        self.next_sweep = 0
        self._taken: tuple[int, int] | None = None  # where the last sweep taken would move the rotation to

    def screening(self) -> bool:
        """Whether evaluations along the way sweep: the last check held and sweeping every example each
        ``coverage_epochs`` epochs costs at most SCREEN_SHARE of the budget."""
        return (self.screen_ok and not self.full() and self.steps_trained > 0
                and self._screen_share() <= SCREEN_SHARE * self.budget)

    def screen_rate(self) -> float:
        """The share of training time that screening every example each ``coverage_epochs`` epochs costs (0 while
        not screening)."""
        return self._screen_share() if self.screening() else 0.0

    def _screen_share(self) -> float:
        return SCREEN_MARGIN * self.n / (self.coverage_epochs * max(self._epoch_s(), 1e-9)) * self._per_screened()

    def _epoch_s(self) -> float:
        return self.train_s / max(self.steps_trained, 1) * self.spe

    def _check_cost(self) -> float:
        """What screening a slice's example adds (jobs that screen check each slice)."""
        return self._per_screened() if self.checked else 0.0

    def _per_screened(self) -> float:
        if self.per_screened is not None:
            return self.per_screened
        return SCREEN_GUESS * self.train_s / max(self.steps_trained, 1) / max(self.n / self.spe, 1.0)

    def sweep_size(self, step: int) -> int:
        """Examples to screen at an evaluation at ``step``: what keeps the screen's cycle within the period."""
        if not self.screening():
            return 0
        due = SCREEN_MARGIN * self.n * (step - self.screened_to) / (self.coverage_epochs * self.spe)
        if self.per_screened is None:  # its cost is a guess until a sweep this large is timed
            due = min(due, 2 * SCREEN_TIMED)
        return int(min(self.n, math.ceil(max(due, 0.0))))

    def sweep_now(self, last: bool) -> int:
        """The planned sweep; at the last evaluation, every example (those its slice scores aside) whatever the
        credit, so that the run's final rankings cover every example (its check decides), as far as FINAL_EPOCHS
        of training time pays."""
        if self.full():
            return 0
        if not last:
            return self.next_sweep
        return int(min(self.n, FINAL_EPOCHS * self._epoch_s() / max(self._per_screened(), 1e-12)))

    def take_screen(self, k: int, step: int) -> np.ndarray:
        """The next ``k`` positions of the screen's rotation, sorted. Its permutation is drawn once and kept from
        cycle to cycle, so no example waits longer than one cycle for its next screening. The rotation moves on
        only once the check agrees (``screen_checked``): examples a disagreeing screen left unwritten come first
        next time."""
        out = np.zeros(0, np.int64)
        if not len(self.screen_order):
            self.screen_order = stratified_permutation(self.labels, self.screen_rng)
        pos = self.screen_pos
        while len(out) < min(k, self.n):
            if pos >= len(self.screen_order):
                pos = 0
            more = self.screen_order[pos : pos + min(k, self.n) - len(out)]
            pos += len(more)
            out = np.concatenate([out, more])
        self._taken = (pos, step)
        return np.sort(np.unique(out))

    def screen_checked(self, agrees: bool, seconds: float, screened: int) -> None:
        """Record a screen: whether it ranked like the exact pass on the slice (if so, the sweep taken with
        ``take_screen`` counts), and what it cost."""
        self.screen_ok, self.checked = agrees, True
        if agrees and self._taken is not None:
            self.screen_pos, self.screened_to = self._taken
        self._taken = None
        if screened >= min(SCREEN_TIMED, self.n):
            self.per_screened = blend(self.per_screened, seconds / screened)
        self.spent_s += seconds

    def _screen_state(self) -> dict:
        return {"screen_rng": self.screen_rng.bit_generator.state, "screen_order": self.screen_order.tolist(),
                **{k: getattr(self, k) for k in STATE}}

    def _load_screen_state(self, state: dict) -> None:
        if "screen_rng" in state:  # older checkpoints: no screening yet (the next check decides)
            self.screen_rng.bit_generator.state = state["screen_rng"]
            self.screen_order = np.asarray(state["screen_order"], dtype=np.int64)
            for key in STATE:
                setattr(self, key, state[key])
