"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis), against a real
server process (the appliance's granian configuration around the test double engine).

Every operation the live `/docs/openapi.json` lists gets schema-conforming (positive) and
schema-violating (negative) requests. Checks: never a 5xx, every response conforms to the documented
status codes, content types and schemas, every 4xx is an OpenAI-shaped error. Bounded: a fixed number
of derandomized examples per operation and mode, no deadline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from tests.hardening import MODEL, error_of
from tests.servers import ServerProcess

pytestmark = pytest.mark.slow

EXAMPLES = 150
OPERATIONS = [
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/translations"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/status"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("fuzz-api") / "server.log"
    process = ServerProcess.product_with_test_double({"MAX_CONCURRENT_REQUESTS": "4", "LOG_LEVEL": "info"}, log)
    try:
        process.wait_until("/ready", timeout=60)
        yield process
    finally:
        assert process.stop() == 0
        assert "request.unhandled_error" not in process.logs()


@pytest.fixture(scope="module")
def api_schema(api_server: ServerProcess) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(api_server.url + "/docs/openapi.json")


def test_every_operation_is_fuzzed(api_schema: schemathesis.BaseSchema) -> None:
    listed = {(method.upper(), path) for path, item in api_schema.raw_schema["paths"].items() for method in item}
    assert listed == set(OPERATIONS)


# Schema-violating requests exist only where the schema constrains an input: the transcription form.
# The "served model" run pins `model` to the served name so requests get past the model check and
# reach the other fields and the audio decoder.
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
RUNS = [(method, path, POSITIVE, False) for method, path in OPERATIONS] + [
    ("POST", "/v1/audio/transcriptions", POSITIVE, True),
    ("POST", "/v1/audio/transcriptions", NEGATIVE, False),
    ("POST", "/v1/audio/transcriptions", NEGATIVE, True),
]
STATUSES: Counter[tuple[str, int]] = Counter()


@pytest.mark.parametrize(
    ("method", "path", "mode", "served_model"),
    RUNS,
    ids=[f"{m} {p} {g.value}{' served-model' if s else ''}" for m, p, g, s in RUNS],
)
def test_api_fuzzing(
    api_schema: schemathesis.BaseSchema,
    api_server: ServerProcess,
    method: str,
    path: str,
    mode: schemathesis.GenerationMode,
    served_model: bool,
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    def run(case: schemathesis.Case) -> None:
        if served_model and isinstance(case.body, dict):
            case.body["model"] = MODEL
        response = case.call(base_url=api_server.url, timeout=30)
        STATUSES[(path, response.status_code)] += 1
        assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
        # The schema cannot say that `file` must hold audio, that `model` must be the served one, or that
        # translation is refused by design: schema-valid requests may get a 4xx. Every other check runs.
        case.validate_response(response, excluded_checks=[positive_data_acceptance])
        if 400 <= response.status_code < 500:
            headers = [(name, value) for name, values in response.headers.items() for value in values]
            error_of(httpx.Response(response.status_code, headers=headers, content=response.content))

    run()


def test_fuzzing_reached_the_pipeline() -> None:
    """The runs above got past validation into decoding (a guard against fuzzing only the 404 path)."""
    print(dict(sorted(STATUSES.items())))  # the numbers in docs/reliability.md
    transcription = {status for (path, status) in STATUSES if path == "/v1/audio/transcriptions"}
    assert {400, 404} <= transcription, STATUSES  # a file that is not audio is a 400 (issue 12)
