"""Test examples' predictions in the store (both backends) and influence queries' lifecycle."""

import numpy as np
import pytest

from app.store import NotFound


def test_test_predictions_are_paged_worst_first_and_older_steps_ignored(store):
    run = store.create_run("test examples", {}, enqueue=False)
    store.add_test_examples(run.id, [0, 1, 2, 1])
    assert store.test_examples(run.id)[1][0].loss is None  # not evaluated yet
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.6, 0.3, 0.1]])
    store.write_test_predictions(run.id, 10, probs)
    total, rows = store.test_examples(run.id)
    assert total == 4 and [r.idx for r in rows] == [2, 3, 1, 0]
    assert rows[0].predicted == 0 and rows[0].loss == pytest.approx(-np.log(0.1))
    assert [r.idx for r in store.test_examples(run.id, limit=2, offset=1)[1]] == [3, 1]
    assert [r.idx for r in store.test_examples(run.id, worst_first=False)[1]][0] == 0
    store.write_test_predictions(run.id, 5, probs[::-1])  # older: ignored
    assert store.test_example(run.id, 2).step == 10
    with pytest.raises(ValueError, match="4 test examples, the predictions 2"):
        store.write_test_predictions(run.id, 20, probs[:2])
    with pytest.raises(NotFound, match="no test example 9"):
        store.test_example(run.id, 9)


def test_an_influence_query_is_claimed_once_and_a_dead_workers_lease_expires(store):
    run = store.create_run("influence", {}, enqueue=False)
    with pytest.raises(NotFound, match="run 999999"):
        store.submit_influence(999999, [1])
    with pytest.raises(ValueError, match="1 to 100"):
        store.submit_influence(run.id, [])
    store.set_run_status(run.id, "running")
    q = store.submit_influence(run.id, [1, 2], k=3)
    assert store.claim_influence("w0") is None  # the run has not ended
    store.set_run_status(run.id, "done")
    assert store.claim_influence("w1", lease_seconds=60).id == q.id  # the session's database: only this test's
    assert store.claim_influence("w2") is None  # held under w1's lease
    store.finish_influence(q.id, error="boom")
    assert store.get_influence(q.id).status == "failed"
    dead = store.submit_influence(run.id, [3])
    assert store.claim_influence("w-dead", lease_seconds=-1).id == dead.id  # its lease has already run out
    assert store.claim_influence("w3").id == dead.id and store.get_influence(dead.id).worker_id == "w3"
    store.finish_influence(dead.id, result=[])
    assert store.get_influence(dead.id).status == "done"
    assert [x.id for x in store.list_influence(run.id)][:2] == [dead.id, q.id]
