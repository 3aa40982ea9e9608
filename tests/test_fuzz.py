"""Fuzz every operation of the OpenAPI schema with schemathesis: no request may produce a server error."""

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from app.main import create_app
from app.settings import Settings
from app.store import Store, make_engine, upgrade


def _app(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    run = store.create_run("fuzz", {"name": "fuzz"}, enqueue=False)
    store.add_examples(run.id, range(50), labels=[i % 3 for i in range(50)])
    store.write_evaluation(run.id, 1, loo=0.2, metrics={"test_nll": 0.3}, idx=np.arange(50),
                           scores=np.linspace(0, 1, 50))
    app = create_app(Settings(), store)
    return app, store.create_token("fuzz")


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    return _app(tmp_path_factory)


def test_no_request_produces_a_server_error(fuzz_app):
    app, token = fuzz_app
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    def fuzz(op):
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            for headers in ({}, {"Authorization": f"Bearer {token}"}):
                response = case.call(headers=headers)
                assert response.status_code < 500, (op.label, case.formatted_path, response.text[:300])

        check()

    for op in operations:
        fuzz(op)
