"""The copied response schemas are exactly those of OpenAI's published API description."""

import importlib.util
import json

import pytest

from tests.conftest import ROOT, SCHEMAS

spec = importlib.util.spec_from_file_location("extract_schemas", ROOT / "scripts" / "extract_schemas.py")
extract = importlib.util.module_from_spec(spec)
spec.loader.exec_module(extract)


@pytest.mark.skipif(not extract.DEFAULT_SPEC.exists(), reason=f"the full description is not at {extract.DEFAULT_SPEC}")
def test_copy_matches_the_published_description():
    full = json.loads(extract.DEFAULT_SPEC.read_text())["components"]["schemas"]
    assert json.loads(SCHEMAS.read_text())["components"]["schemas"] == extract.closure(full)
