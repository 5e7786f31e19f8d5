"""scripts/fuzz.py in its short form: 300 requests built from the server's own OpenAPI document, every route, with
hostile values (lone surrogates, control characters, deep nesting, extreme numbers, raw bad bytes) anywhere. No
answer may be a 5xx, every 4xx must be OpenAI's error shape, nothing may hang, and the server must still answer."""

import json
import re
import subprocess
import sys

import httpx

from tests.conftest import ROOT


def test_the_openapi_document_describes_the_request_bodies(ops_servers):
    doc = httpx.get(ops_servers["strict"].url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model, field, limit in (("/v1/completions", "CompletionRequest", "prompt", "max_tokens"),
                                      ("/v1/chat/completions", "ChatCompletionRequest", "messages", "max_tokens"),
                                      ("/v1/responses", "ResponsesRequest", "input", "max_output_tokens")):
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
        assert field in schemas[model]["required"] and limit in schemas[model]["properties"]
        assert {"200", "400", "404", "413", "503"} <= set(op["responses"])
        assert "422" not in op["responses"]  # this server answers 400, never FastAPI's 422
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc))
    assert refs and all(name in schemas for name in refs)  # every reference resolves


def test_fuzzing_every_route_gets_no_5xx(ops_servers):
    server = ops_servers["strict"]
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz.py"), "--url", server.url, "--examples", "300",
                          "--seed", "1", "--timeout", "30"], capture_output=True, text=True, timeout=600)
    assert run.stdout, run.stderr[-3000:]
    report = json.loads(run.stdout)
    print(json.dumps(report, indent=1))
    assert report["5xx"] == 0 and not report["failures"], report["failures"]
    doc = httpx.get(server.url + "/openapi.json").json()
    operations = sum(len(methods) for methods in doc["paths"].values())
    assert operations >= 13 and "/v1/responses" in doc["paths"] and "/tokenize" in doc["paths"]
    assert report["sent"] > 200 and len(report["routes"]) == operations  # every route of the document
    assert report["status"].get("200", 0) > 20 and report["status"].get("400", 0) > 20
    assert run.returncode == 0
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}).status_code == 200
