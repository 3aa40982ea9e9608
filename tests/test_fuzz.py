"""Fuzz every operation of the OpenAPI schema with schemathesis: no request may produce a server error."""

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from app.main import create_app
from app.settings import Settings
from app.store import Store, make_engine, upgrade


def _seeded(url: str) -> Store:
    """A migrated store with one run: examples and an evaluation, so that the routes reach their logic."""
    upgrade(make_engine(url))
    store = Store(url)
    run = store.create_run("fuzz", {"name": "fuzz"}, enqueue=False)
    store.add_examples(run.id, range(50), labels=[i % 3 for i in range(50)])
    store.write_evaluation(run.id, 1, loo=0.2, metrics={"test_nll": 0.3}, idx=np.arange(50),
                           scores=np.linspace(0, 1, 50))
    return store


def _app(tmp_path_factory):
    store = _seeded(f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'fuzz.db'}")
    return create_app(Settings(), store), store.create_token("fuzz")


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


def test_the_api_conforms_to_its_openapi_schema(tmp_path):
    """schemathesis with every check (status codes, content types, response schemas, Allow headers, schema-valid
    requests accepted and invalid ones refused, stateful links) against a real server: 0 failures. CI runs a short
    pass; `FUZZ_EXAMPLES=100 pytest -k conforms` the long one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import free_port, serving

    url = f"sqlite:///{tmp_path / 'conform.db'}"
    token = _seeded(url).create_token("conform")
    port = free_port()
    root = Path(__file__).parents[1]
    with serving(["--db", url, "serve", "--port", str(port)], port) as base:
        out = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json",
                              "--checks", "all",
                              "-H", f"Authorization: Bearer {token}", "--seed", "0", "--request-timeout", "5",
                              "--max-examples", os.environ.get("FUZZ_EXAMPLES", "8"), "--output-truncate", "false"],
                             cwd=root, capture_output=True, text=True, timeout=900)  # cwd: schemathesis.toml
    assert out.returncode == 0, out.stdout[-6000:]
    assert "failures" not in out.stdout.splitlines()[-1], out.stdout[-3000:]
