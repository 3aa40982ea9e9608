"""The store on SQLite and PostgreSQL: runs, jobs, evaluations, queries, idempotence, bad input."""

import math
from collections.abc import Sequence

import numpy as np
import pytest

from app.store import NotFound, Store


def _write(store, run_id, step, n=5000, seed=0, **kw):
    rng = np.random.default_rng(seed)
    scores = rng.random(n)
    store.write_evaluation(run_id, step, loo=0.3 + step * 1e-3, metrics={"train_nll": 0.2, "test_nll": 0.4},
                           idx=np.arange(n) + 100, scores=scores, loo_losses=scores * 2, prob_label=1 - scores,
                           epoch=step / 10, **kw)
    return scores


def test_run_lifecycle_and_listing(store):
    run = store.create_run("digits <b>", {"lr": 0.5})
    assert store.get_run(run.id).config == {"lr": 0.5}
    assert store.get_run(run.id).status == "queued"
    assert run.id in [r.id for r in store.list_runs(status="queued")]
    store.request_stop(run.id)
    assert store.get_run(run.id).status == "cancelled"
    with pytest.raises(NotFound, match="run 999999 not found"):
        store.get_run(999999)
    with pytest.raises(NotFound):
        store.request_stop(999999)


def test_top_and_bottom_k_and_history(store):
    run = store.create_run("r", enqueue=False)
    store.add_examples(run.id, np.arange(5000) + 100, labels=np.arange(5000) % 10,
                       flipped=np.arange(5000) % 7 == 0)
    scores = {}
    for step in (10, 20, 30):
        scores[step] = _write(store, run.id, step, seed=step)
    step, top = store.examples_at(run.id, k=50)
    assert step == 30
    expect = np.argsort(-scores[30], kind="stable")[:50] + 100
    assert [r.idx for r in top] == expect.tolist()
    assert [r.rank for r in top] == list(range(50))
    assert top[0].label == int(expect[0] - 100) % 10 and top[0].flipped == (int(expect[0] - 100) % 7 == 0)
    _, page2 = store.examples_at(run.id, step=30, k=50, offset=50)
    assert page2[0].rank == 50
    _, least = store.examples_at(run.id, step=20, k=10, least=True)
    assert [r.idx for r in least] == (np.argsort(scores[20], kind="stable")[:10] + 100).tolist()
    _, across = store.examples_at(run.id, step=10, k=3000, offset=1000)  # crosses chunk bounds, capped at 1000
    assert [r.rank for r in across] == list(range(1000, 2000))
    hist = store.example_history(run.id, 100 + 1234)
    assert [h.step for h in hist] == [10, 20, 30]
    assert hist[1].score == pytest.approx(scores[20][1234], rel=1e-6)
    with pytest.raises(NotFound, match="no evaluation at step 15"):
        store.examples_at(run.id, step=15)
    with pytest.raises(NotFound, match="example 7 of run"):
        store.example_history(run.id, 7)


def test_rewriting_an_evaluation_replaces_it(store):
    run = store.create_run("r", enqueue=False)
    _write(store, run.id, 10, seed=1)
    second = _write(store, run.id, 10, seed=2)
    assert [e.step for e in store.evaluations(run.id)] == [10]
    assert store.curve(run.id, "loo") == [(10, pytest.approx(0.31))]
    _, top = store.examples_at(run.id, step=10, k=1)
    assert top[0].idx == int(np.argmax(second)) + 100


def test_non_finite_values_become_null_and_rank_last(store):
    run = store.create_run("r", enqueue=False)
    scores = np.array([0.5, np.nan, 2.0, np.inf, 1.0])
    store.write_evaluation(run.id, 1, loo=float("nan"), metrics={"test_nll": float("inf"), "acc": 0.5},
                           idx=np.arange(5), scores=scores, loo_losses=scores, prob_label=scores)
    ev = store.evaluations(run.id)[0]
    assert ev.loo is None and ev.metrics == {"test_nll": None, "acc": 0.5}
    _, rows = store.examples_at(run.id, k=5)
    assert [r.idx for r in rows][:3] == [2, 4, 0]
    assert all(r.score is None for r in rows[3:])
    assert not any(isinstance(r.score, float) and not math.isfinite(r.score) for r in rows)


def test_curve_downsampling_keeps_extremes(store):
    run = store.create_run("r", enqueue=False)
    values = np.sin(np.arange(20000) / 500.0)
    values[12345] = 7.0
    values[777] = float("nan")
    store.log_metrics(run.id, "train_nll", list(range(20000)), values.tolist())
    pts = store.curve(run.id, "train_nll", max_points=500)
    assert len(pts) <= 500
    assert (12345, 7.0) in pts and min(v for _, v in pts) == pytest.approx(np.nanmin(values))
    assert [s for s, _ in pts] == sorted(s for s, _ in pts)
    store.log_metrics(run.id, "train_nll", [12345], [0.0])  # replaced: the spike is gone from the rollups
    assert max(v for _, v in store.curve(run.id, "train_nll", max_points=500)) < 1.01
    assert len(store.curve(run.id, "train_nll")) == 20000 or len(store.curve(run.id, "train_nll")) <= 2000
    tail = store.curve(run.id, "train_nll", since_step=19990)
    assert [s for s, _ in tail] == list(range(19991, 20000))


def test_the_rollups_of_series_written_together_are_each_series_own(store):
    """An evaluation's metrics are rolled up in one pass (``refresh_rollups`` groups the series of one bucket): each
    series' rollup rows are what recomputing it alone gives, across top-level buckets and with non-finite points."""
    from sqlalchemy import select

    from app.store.models import MetricRollup
    from app.store.rollups import _rows

    run = store.create_run("r", enqueue=False)
    rng = np.random.default_rng(3)
    steps = sorted(rng.choice(10000, 60, replace=False).tolist()) + [4095, 4096]  # across the 4096-step buckets
    raw: dict[str, list] = {"a": [], "b": [], "c": []}
    for st in sorted(set(steps)):
        vals = {"a": float(rng.normal()), "b": float(rng.normal()) if st % 3 else float("nan"), "c": float(st)}
        if st % 5 == 0:
            del vals["c"]  # a series missing at some evaluations
        store.write_evaluation(run.id, st, loo=vals["a"], metrics={k: v for k, v in vals.items() if k != "a"},
                               idx=np.arange(3), scores=np.ones(3), loo_losses=np.ones(3))
        for k, v in vals.items():
            raw[k].append((st, v if v == v else None))
    with store.session() as s:
        got = s.execute(select(MetricRollup).where(MetricRollup.run_id == run.id)).scalars().all()
        table = {(r.name, r.level, r.bucket): (r.n, r.min_step, r.min_value, r.max_step, r.max_value) for r in got}
    for name, pts in (("b", raw["b"]), ("c", raw["c"])):
        want = {(r["name"], r["level"], r["bucket"]): (r["n"], r["min_step"], r["min_value"], r["max_step"],
                                                       r["max_value"]) for r in _rows(run.id, name, pts)}
        assert {k: v for k, v in table.items() if k[0] == name} == want
    assert max(v for _, v in store.curve(run.id, "c", max_points=10)) == max(v for _, v in raw["c"])


def _drain(store):
    """Jobs left claimable by earlier tests in the session's shared PostgreSQL database."""
    while (job := store.claim_job("drain", lease_seconds=3600)) is not None:
        store.finish_job(job.id, "cancelled")


def test_job_queue_claim_heartbeat_finish_and_expired_lease(store):
    _drain(store)
    a = store.create_run("a")
    b = store.create_run("b")
    j1 = store.claim_job("w1", lease_seconds=60)
    j2 = store.claim_job("w2", lease_seconds=-1)  # already expired: as if its worker died
    assert {j1.run_id, j2.run_id} == {a.id, b.id}
    assert store.get_run(j1.run_id).status == "running"
    assert store.heartbeat(j1.id, "w1")
    assert not store.heartbeat(j1.id, "intruder")
    retaken = store.claim_job("w3")
    assert retaken.id == j2.id and retaken.attempts == 2
    assert not store.heartbeat(j2.id, "w2")  # the dead worker lost its job
    store.finish_job(j1.id, "done")
    assert store.get_run(j1.run_id).status == "done"
    assert store.claim_job("w4") is None
    store.finish_job(retaken.id, "queued")  # released (SIGTERM): back in the queue
    assert store.claim_job("w5").id == j2.id
    assert (store.get_job(j1.id).state, store.get_job(j2.id).state) == ("done", "running")
    assert store.jobs_by_state()["running"] >= 1


def test_tokens_are_hashed_and_verifiable(store):
    token = store.create_token("ci")
    assert store.verify_token(token) and not store.verify_token(token + "x") and not store.verify_token(None)
    from app.store.models import ApiToken

    with store.session() as s:
        stored = [t.token_hash for t in s.query(ApiToken).all()]
    assert token not in stored
    store.revoke_token("ci")
    assert not store.verify_token(token)


def test_hooks_and_early_stopping_state(store):
    run = store.create_run("r", enqueue=False)
    h = store.add_hook("http://127.0.0.1:9/hook", ["evaluation", "finished"], run_id=run.id)
    assert [x.id for x in store.hooks_for(run.id)] == [h.id] and len(h.secret) == 64
    store.delete_hook(h.id)
    with pytest.raises(NotFound):
        store.delete_hook(h.id)
    store.save_early_stop(run.id, monitor="loo", mode="min", best=0.3, best_step=10, wait=0)
    store.save_early_stop(run.id, wait=2, best=float("nan"))
    st = store.early_stop(run.id)
    assert (st.monitor, st.best, st.best_step, st.wait) == ("loo", None, 10, 2)


def test_writes_for_unknown_runs_and_bad_arrays_are_refused(store):
    with pytest.raises(NotFound):
        store.write_evaluation(424242, 1, loo=0.1, metrics={})
    run = store.create_run("r", enqueue=False)
    with pytest.raises(ValueError, match="unique"):
        store.write_evaluation(run.id, 1, loo=0.1, metrics={}, idx=np.array([1, 1]), scores=np.array([0.1, 0.2]))
    assert store.evaluations(run.id) == []  # nothing half-written


def test_sqlite_concurrent_writers_do_not_fail(tmp_path):
    """Two processes writing evaluations at once: WAL + BEGIN IMMEDIATE + busy timeout, no 'database is locked'."""
    import subprocess
    import sys

    from app.store import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(make_engine(url))
    run = Store(url).create_run("r", enqueue=False)
    code = ("import sys, numpy as np; from app.store import Store; s = Store(sys.argv[1]); o = int(sys.argv[3])\n"
            "for step in range(o, o + 40):\n"
            "    s.write_evaluation(int(sys.argv[2]), step, loo=0.1, metrics={'a': 1.0}, idx=np.arange(2000),"
            " scores=np.random.rand(2000))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(run.id), str(o)]) for o in (0, 1000)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(Store(url).evaluations(run.id, limit=1000)) == 80


def test_running_mean_loo_loss_over_evaluations(store):
    """Each example's mean of its finite LOO losses over this and earlier evaluations that included it; a rewritten
    step replaces its own contribution; by="loo_mean" ranks by it."""
    run = store.create_run("r", enqueue=False)
    rng = np.random.default_rng(0)
    n = 5000  # spans several idx buckets, rank chunks, and more than the two "mean" chunks
    losses = {step: rng.random(n) for step in (10, 20, 30)}
    losses[20][5] = np.nan  # skipped, not averaged as 0
    include = {10: np.arange(n), 20: np.arange(n), 30: np.arange(1, n)}  # example 0 missing at step 30
    for step in (10, 20, 20, 30):  # step 20 written twice: the second replaces the first
        if step == 20 and store.latest_step(run.id) == 20:
            losses[20] = losses[20] * 0.5
        idx = include[step]
        store.write_evaluation(run.id, step, loo=0.3, metrics={}, idx=idx + 100, scores=rng.random(len(idx)),
                               loo_losses=losses[step][idx], prob_label=None)
    table = store.examples_table(run.id, 30)
    got = dict(zip(table["idx"], zip(table["loo_loss_mean"], table["loo_loss_evals"])))
    stack = np.stack([losses[10], losses[20], losses[30]])
    expect = np.nanmean(stack, 0)
    assert got[100 + 5] == (pytest.approx(np.mean([losses[10][5], losses[30][5]]), rel=1e-6), 2)
    assert got[100 + 7] == (pytest.approx(expect[7], rel=1e-6), 3)
    assert 100 not in got
    _, top = store.examples_at(run.id, k=20, by="loo_mean")
    order = np.argsort(-expect[1:], kind="stable")[:20] + 101
    assert [r.idx for r in top] == order.tolist()
    assert [r.loo_loss_mean for r in top] == pytest.approx(expect[order - 100], rel=1e-6)
    assert [r.loo_loss_evals for r in top] == [2 if i == 105 else 3 for i in order]
    _, least = store.examples_at(run.id, k=5, by="loo_mean", least=True)
    assert [r.idx for r in least] == (np.argsort(expect[1:], kind="stable")[:5] + 101).tolist()
    full = np.argsort(-expect[1:], kind="stable") + 101
    for offset in (1990, 2500, 4000):  # across the head chunk's end, a deep page (sorts everything), the tail
        _, page = store.examples_at(run.id, k=100, offset=offset, by="loo_mean")
        assert [r.idx for r in page] == full[offset : offset + 100].tolist()
    _, page = store.examples_at(run.id, k=10, offset=4995, by="loo_mean")
    assert len(page) == 4  # 4999 examples at step 30
    hist = store.example_history(run.id, 100)
    assert [(h.step, h.loo_loss_evals) for h in hist] == [(10, 1), (20, 2)]
    with pytest.raises(ValueError, match="ordered by 'score' or 'loo_mean'"):
        store.examples_at(run.id, by="loss")


def test_the_stored_ends_by_mean_agree_with_the_full_sort():
    """The "mean" chunks hold the first and last CHUNK of the full order, ties (NaN means, equal losses) broken by
    index alike: a page served from them equals the same page from sorting every record."""
    from app.store.records import RECORD, _first_by_mean, order_by_mean

    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 6000))
        rec = np.zeros(n, RECORD)
        rec["idx"] = rng.permutation(n)
        rec["loo_mean"] = rng.integers(0, 5, n) if trial % 2 else rng.random(n)  # many ties, or none
        rec["loo_mean"][rng.random(n) < 0.1] = np.nan
        full = order_by_mean(rec)["idx"]
        for k in (1, 7, 2048):
            assert _first_by_mean(rec, k)["idx"].tolist() == full[:k].tolist()
            assert _first_by_mean(rec, k, last=True)["idx"].tolist() == full[-k:].tolist()


def test_an_evaluation_of_a_slice_carries_every_other_examples_last_record(store):
    """Slices in rotation: each evaluation's snapshot holds every example scored so far, with the step of its
    scoring; the running means fold only real scorings; history lists only those; rankings cover the snapshot."""
    run = store.create_run("rotation", enqueue=False)
    slices = {10: [0, 1, 2], 20: [3, 4, 5], 30: [0, 4, 6]}
    loss = {10: 1.0, 20: 2.0, 30: 3.0}
    for step, idx in slices.items():
        store.write_evaluation(run.id, step, loo=0.5, metrics={"loo_se": 0.1}, idx=np.array(idx),
                               scores=np.array(idx, float) + step, loo_losses=np.full(len(idx), loss[step]),
                               prob_label=None, carry=True)
    table = store.examples_table(run.id, 30)
    rows = {i: (sc, m, e, st) for i, sc, m, e, st in zip(table["idx"], table["score"], table["loo_loss_mean"],
                                                         table["loo_loss_evals"], table["scored_step"])}
    assert rows == {0: (30.0, 2.0, 2, 30), 1: (11.0, 1.0, 1, 10), 2: (12.0, 1.0, 1, 10), 3: (23.0, 2.0, 1, 20),
                    4: (34.0, 2.5, 2, 30), 5: (25.0, 2.0, 1, 20), 6: (36.0, 3.0, 1, 30)}
    assert store.evaluations(run.id)[-1].n_examples == 7
    _, top = store.examples_at(run.id, k=3)
    assert [(r.idx, r.scored_step) for r in top] == [(6, 30), (4, 30), (0, 30)]
    _, stale = store.examples_at(run.id, k=3, least=True)
    assert [(r.idx, r.scored_step, r.step) for r in stale] == [(1, 10, 30), (2, 10, 30), (3, 20, 30)]
    assert [(h.step, h.loo_loss) for h in store.example_history(run.id, 1)] == [(10, 1.0)]  # not the carried rows
    assert [(h.step, h.loo_loss_evals) for h in store.example_history(run.id, 4)] == [(20, 1), (30, 2)]
    # without carry (a fixed subset, a hand-written loop): the evaluation holds what it scored, as before
    store.write_evaluation(run.id, 40, loo=0.5, metrics={}, idx=np.array([1]), scores=np.array([1.0]),
                           loo_losses=np.array([4.0]), prob_label=None)
    assert store.examples_table(run.id, 40)["idx"] == [1]


def test_screened_records_say_so_in_tables_pages_and_history_and_keep_it_when_carried(store):
    """An evaluation that screened some of its examples (sensitivity.screen) marks their records; carried to the
    next evaluation they stay marked, an exact scoring of the same example clears it; a bad mask is refused."""
    run = store.create_run("screened", enqueue=False)
    store.write_evaluation(run.id, 10, loo=0.5, metrics={}, idx=np.array([0, 1, 2]), scores=np.array([3.0, 2.0, 1.0]),
                           loo_losses=np.ones(3), prob_label=None, carry=True, screened=np.array([False, True, True]))
    store.write_evaluation(run.id, 20, loo=0.5, metrics={}, idx=np.array([2, 3]), scores=np.array([5.0, 0.5]),
                           loo_losses=np.ones(2), prob_label=None, carry=True)
    table = store.examples_table(run.id, 20)
    assert dict(zip(table["idx"], zip(table["screened"], table["scored_step"]))) == {
        0: (False, 10), 1: (True, 10), 2: (False, 20), 3: (False, 20)}
    _, top = store.examples_at(run.id, k=4)
    assert [(r.idx, r.screened) for r in top] == [(2, False), (0, False), (1, True), (3, False)]
    assert [(h.step, h.screened) for h in store.example_history(run.id, 2)] == [(10, True), (20, False)]
    with pytest.raises(ValueError, match="screened has 1 entries for 2 examples"):
        store.write_evaluation(run.id, 30, loo=0.5, metrics={}, idx=np.array([0, 1]), scores=np.ones(2),
                               loo_losses=np.ones(2), prob_label=None, screened=np.array([True]))


def test_carried_scores_follow_the_calibration_scale_when_they_are_proportional_to_it(store):
    """A calibrated first-order run: each evaluation's scores are at its own refitted scale; the examples it carries
    are brought to that scale, so the ranking compares every example at one scale (their own history is untouched)."""
    run = store.create_run("scaled", enqueue=False)
    for step, idx, alpha in ((10, [0, 1], 2.0), (20, [2], 4.0), (30, [3], 1.0)):
        raw = np.array(idx, float) + 1.0  # the score at scale 1
        store.write_evaluation(run.id, step, loo=0.5, metrics={"calibration_scale": alpha}, idx=np.array(idx),
                               scores=raw * alpha, loo_losses=np.ones(len(idx)), prob_label=None, carry=True,
                               scores_scale=True)
    table = store.examples_table(run.id, 30)
    assert dict(zip(table["idx"], table["score"])) == pytest.approx({0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0})
    assert [r.idx for r in store.examples_at(run.id, k=4)[1]] == [3, 2, 1, 0]  # the order at scale 1
    assert [h.score for h in store.example_history(run.id, 1)] == [4.0]  # as scored, at step 10's scale
    # a scale missing on either side (an uncalibrated evaluation): carried as they were
    store.write_evaluation(run.id, 40, loo=0.5, metrics={}, idx=np.array([4]), scores=np.array([9.0]),
                           loo_losses=np.ones(1), prob_label=None, carry=True, scores_scale=True)
    table = store.examples_table(run.id, 40)
    assert dict(zip(table["idx"], table["score"]))[0] == pytest.approx(1.0)


def test_examples_are_inserted_a_batch_at_a_time_from_a_lazy_sequence(store):
    """A worker's thumbnails are made as the store reads them (worker.data.Thumbnails): the store reads them in
    order, a batch at a time, and keeps every one."""
    from sqlalchemy import event, select

    from app.store.models import INSERT_BATCH, Example

    n = INSERT_BATCH * 2 + 5
    reads = []

    class Lazy(Sequence):
        def __len__(self):
            return n

        def __getitem__(self, i):
            reads.append(i)
            return f"png {i}".encode()

    made_at_insert = []

    def count(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO examples"):
            made_at_insert.append(len(reads))

    run = store.create_run("lazy")
    event.listen(store.engine, "before_cursor_execute", count)
    try:
        store.add_examples(run.id, range(n), labels=[i % 3 for i in range(n)], thumbnails=Lazy())
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert reads == list(range(n))  # each made once, in order
    assert made_at_insert == [INSERT_BATCH, 2 * INSERT_BATCH, n]  # never more than a batch ahead of the inserts
    with store.session() as s:
        got = dict(s.execute(select(Example.idx, Example.thumbnail).where(Example.run_id == run.id)).all())
    assert len(got) == n and got[0] == b"png 0" and got[n - 1] == f"png {n - 1}".encode()
    assert store.get_run(run.id).n_examples == n
