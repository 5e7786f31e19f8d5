"""The servers that the operations and hardening tests share, started side by side once."""

import pytest

from tests.conftest import start_side_by_side


@pytest.fixture(scope="session")
def ops_servers(start_server, tiny_llama_dir):
    tiny = ("--model", str(tiny_llama_dir), "--served-model-name", "tiny")
    return start_side_by_side(
        start_server,
        locked=(*tiny, "--api-key", "key-one,key-two", "--cors-origins", "https://app.example", "--log-format", "json"),
        log_prompts=(*tiny, "--log-prompts", "--max-body-bytes", "2000"),  # its tests send small bodies
        counted=tiny,  # its metrics count the requests of the tests that use it only
        # the default model (fast enough to fuzz, slow enough that a long stream outlasts a dropped connection) with
        # tight connection limits and a small waiting room
        strict=("--header-timeout", "1", "--body-timeout", "2", "--write-timeout", "1", "--max-connections", "60",
                "--max-waiting", "4"),
    )
