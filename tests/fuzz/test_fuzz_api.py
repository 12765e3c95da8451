"""The control API's OpenAPI schema, fuzzed against a real `vf server --dev` of its own: every
read operation, called with an admin token on generated paths and query parameters, answers
without a server error, and its bodies and status codes are those its schema documents. A few
derandomized examples per operation.

Two checks are left out, for gaps in the schema rather than in the server: error bodies are
JSON where an operation documents only its `text/plain` success (build and agent logs), and a
query parameter validated beyond its declared type (`since` on /events: a time, declared a
string) is answered 400 for a schema-valid value.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from tests.support import Server, admin_token


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(Path(tmp_path_factory.mktemp("fuzz-api"))).start()
    yield srv
    srv.stop()


def test_reads_answer_without_server_errors_and_as_documented(api_server: Server) -> None:
    schema = schemathesis.openapi.from_url(api_server.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {admin_token()}"}
    # Reads only: writes start builds and processes, which this bounded run is not for.
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the schema has an invalid operation: {result}"
        if result.ok().method.upper() == "GET":
            operations.append(result.ok())
    assert len(operations) > 10, "the schema lists too few read operations"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=8, suppress_health_check=list(HealthCheck))
        def call(case: Case[Any]) -> None:
            case.call_and_validate(
                base_url=api_server.url,
                headers=headers,
                checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
            )

        call()
