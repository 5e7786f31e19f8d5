"""No Docker engine runs here, so check what can be checked: every path the Dockerfile copies exists,
and the module it runs at build time is real."""

import re

from tests.conftest import ROOT


def test_dockerfile_copies_existing_paths():
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
    assert "from server.engine.loader import default_gguf, gguf_to_hf_dir" in text
    from server.engine.loader import default_gguf, gguf_to_hf_dir  # noqa: F401
