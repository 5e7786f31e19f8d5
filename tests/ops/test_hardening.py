"""Hostile clients against real servers on real ports: every input a clean 4xx in OpenAI's shape, no forged log
lines, no connection held open by a slow client, and 5xx counts that only the server's own faults can raise."""

import json
import socket
import threading
import time

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def strict(ops_servers):
    """The default model; header timeout 1 s, body timeout 2 s, write timeout 1 s, 60 connections, 4 waiting."""
    return ops_servers["strict"]


def metrics(server) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def fivexx(server) -> float:
    return sum(v for k, v in metrics(server).items() if k.startswith("polyglot_requests_total") and 'status="5' in k)


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["type"] and "code" in error
    if param is not None:
        assert error["param"] == param, error
    return error


def raw(server, data: bytes, wait: float = 10) -> bytes:
    """Send bytes on a fresh connection; everything the server sends back until it closes (or `wait` passes)."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(wait)
        s.sendall(data)
        return _read_until_closed(s)


def _read_until_closed(s: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def post(server, path: str, body: bytes) -> httpx.Response:
    return httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)


# -- 1, 2: what JSON allows and text does not ---------------------------------------------------------------------
def test_lone_surrogates_anywhere_get_a_400_naming_the_field(strict):
    before = fivexx(strict)
    cases = [
        ("/v1/completions", b'{"prompt": "\\ud800abc", "max_tokens": 1}', "prompt"),
        ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 1}', "prompt"),
        ("/v1/completions", b'{"prompt": "\\ud800", "echo": true, "max_tokens": 1}', "prompt"),
        ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi", "max_tokens": 1}', "model"),
        ("/v1/completions", b'{"prompt": "hi", "stop": ["\\ud83d"], "max_tokens": 1}', "stop"),
        ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"\\ud800": 1}, "max_tokens": 1}', "logit_bias"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}',
         "messages"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udc00"}]}], "max_tokens": 1}',
         "messages"),
        ("/v1/completions", b'{"prompt": "\xed\xa0\x80 CESU-8 bytes", "max_tokens": 1}', "prompt"),
    ]
    for path, body, param in cases:
        error = assert_error(post(strict, path, body), 400, param)
        assert "surrogate" in error["message"]
    ok = post(strict, "/v1/completions", b'{"prompt": "\\ud83d\\ude00 a pair is fine", "max_tokens": 1}')
    assert ok.status_code == 200
    assert fivexx(strict) == before
    assert "Traceback" not in strict.log_path.read_text()


def test_deep_nesting_gets_a_400_not_a_recursion_error(strict):
    assert_error(post(strict, "/v1/completions", b"[" * 100_000 + b"]" * 100_000), 400)
    error = assert_error(post(strict, "/v1/completions", b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}"), 400, "prompt")
    assert "levels deep" in error["message"]
    ok = {"model": MODEL, "prompt": [[1, 2]], "max_tokens": 1}  # nesting OpenAI's own bodies use is fine
    assert httpx.post(strict.url + "/v1/completions", json=ok).status_code == 200
    assert "RecursionError" not in strict.log_path.read_text()


# -- 3: log lines a client cannot forge ---------------------------------------------------------------------------
def test_text_log_lines_escape_control_characters_from_the_path(ops_servers):
    server = ops_servers["log_prompts"]  # text log format
    r = httpx.get(server.url + "/x%0aFORGED%20line%1b[2J%c2%9b%e2%80%ae")
    assert_error(r, 404)
    time.sleep(0.3)
    log = server.log_path.read_text()
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    assert "\x1b" not in log and "\x9b" not in log and "\u202e" not in log
    assert "GET /x\\nFORGED line\\x1b[2J\\x9b\\u202e 404" in log


def test_json_log_lines_escape_c1_controls_too_and_401s_are_logged(ops_servers):
    server = ops_servers["locked"]  # JSON logs and an API key: the probe needs no key
    assert_error(httpx.get(server.url + "/v1/x%c2%9b%0a%e2%80%a8y"), 401)
    time.sleep(0.3)
    text = server.log_path.read_text()
    assert "\x9b" not in text and "\u2028" not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(line.get("path") == "/v1/x\x9b\n\u2028y" and line["status"] == 401 for line in lines)


# -- 4: a client that hangs up is not the server's fault -------------------------------------------------------------
def test_hanging_up_mid_body_is_a_499_not_a_500(strict):
    before, before_5xx = metrics(strict), fivexx(strict)
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", strict.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"prompt\": \"")
            time.sleep(0.02)
    time.sleep(0.5)
    after = metrics(strict)
    key = 'polyglot_requests_total{endpoint="/v1/completions",status="499"}'
    assert after.get(key, 0) - before.get(key, 0) == 20
    assert fivexx(strict) == before_5xx
    assert "ClientDisconnect" not in strict.log_path.read_text()


# -- 5: logit_bias keys are decimal token ids ------------------------------------------------------------------------
def test_logit_bias_keys_must_be_decimal_token_ids(strict):
    for key in ("-1", " 1 ", "+2", "1_0", "0x10", "٣", "²", "1e3", "", "99999999"):
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "logit_bias": {key: 100}}
        assert_error(httpx.post(strict.url + "/v1/completions", json=body), 400, "logit_bias")
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0, "logit_bias": {"28": 100}}
    out = httpx.post(strict.url + "/v1/completions", json=body).json()
    assert out["choices"][0]["text"] == ",,,", out  # 28 is "," in this vocabulary: the bias took


# -- 6: slow clients -------------------------------------------------------------------------------------------------
def test_slowloris_headers_and_bodies_are_cut_off(strict):
    """40 connections send a header line (or a body byte) every 0.5 s: each is answered 408 and closed after its
    timeout (1 s for headers, 2 s for bodies), while the server answers others as usual."""
    results: dict[int, tuple[float, bytes]] = {}

    def trickle(i: int) -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", strict.port)) as s:
            s.settimeout(10)
            if i % 2:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            else:
                s.sendall(b"GET /health HTTP/1.1\r\n")
            try:
                for _ in range(20):
                    time.sleep(0.5)
                    s.sendall(b" " if i % 2 else b"X-Slow: yes\r\n")
            except OSError:  # the server closed it
                pass
            results[i] = (time.monotonic() - started, _read_until_closed(s))

    threads = [threading.Thread(target=trickle, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert httpx.get(strict.url + "/health", timeout=5).status_code == 200
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 40
    for i, (took, answer) in results.items():
        assert answer.startswith(b"HTTP/1.1 408 "), (i, answer[:200])
        assert b'"error"' in answer and took < 8, (i, took)
    m = metrics(strict)
    assert m['polyglot_dropped_connections_total{reason="header_timeout"}'] >= 20
    assert m['polyglot_requests_total{endpoint="/v1/completions",status="408"}'] >= 20


def test_a_client_that_stops_reading_its_stream_is_dropped_and_its_rows_freed(strict):
    dropped = 'polyglot_dropped_connections_total{reason="write_timeout"}'
    before = metrics(strict).get(dropped, 0)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "n": 8,
                       "max_tokens": 1000, "ignore_eos": True, "stream": True, "logprobs": True,
                       "top_logprobs": 20}).encode()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", strict.port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        for _ in range(100):  # 8 rows x 1,000 tokens take minutes; unread, they fill the buffers in seconds
            if httpx.get(strict.url + "/health").json()["running"] == 1:
                break
            time.sleep(0.1)
        started = time.monotonic()
        # the send buffers fill in seconds on a quiet machine, in more than 30 s on a loaded one
        while httpx.get(strict.url + "/health").json()["running"] and time.monotonic() - started < 120:
            time.sleep(0.2)
        freed_after = time.monotonic() - started
    assert freed_after < 120, "the rows of an unread stream were not freed"
    assert metrics(strict)[dropped] == before + 1


def test_connections_past_the_limit_get_a_503_and_are_closed(strict):
    idle = [socket.create_connection(("127.0.0.1", strict.port)) for _ in range(60)]
    try:
        answer = raw(strict, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", wait=5)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in answer
        assert b"retry-after: 1" in answer.lower()
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    assert httpx.get(strict.url + "/health").status_code == 200


# -- 7: a request the server can never take is a 400, not a 503 to retry -----------------------------------------
def test_more_prompts_or_rows_than_the_server_can_hold_is_a_400(strict):
    r = httpx.post(strict.url + "/v1/completions", json={"model": MODEL, "prompt": ["a"] * 5, "max_tokens": 1})
    assert_error(r, 400, "prompt")
    assert "retry-after" not in r.headers
    r = httpx.post(strict.url + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 64, "max_tokens": 1})
    error = assert_error(r, 400, "n")
    assert "128 rows" in error["message"]
    r = httpx.post(strict.url + "/v1/completions", json={"model": MODEL, "prompt": ["a"] * 4, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


# -- 8: headers, documents, framing --------------------------------------------------------------------------------
def test_security_headers_on_every_response_and_no_cdn_docs_by_default(strict):
    for path in ("/", "/playground/index.html", "/health", "/v1/models", "/openapi.json", "/nope"):
        r = httpx.get(strict.url + path)
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert "default-src 'self'" in r.headers["content-security-policy"], path
    for path in ("/docs", "/redoc"):
        assert_error(httpx.get(strict.url + path), 404)
    bad = raw(strict, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400 ") and b'"invalid_http"' in bad  # h11's parse error, in OpenAI's shape


def test_cors_preflight_allows_the_openai_sdk_headers(ops_servers):
    asked = "authorization,content-type,x-stainless-os,x-stainless-lang,x-stainless-retry-count,x-stainless-timeout"
    r = httpx.options(ops_servers["locked"].url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked})
    assert r.status_code == 200
    allowed = {h.strip() for h in r.headers["access-control-allow-headers"].lower().split(",")}
    assert set(asked.split(",")) <= allowed
    r = httpx.options(ops_servers["locked"].url + "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-evil"})
    assert r.status_code == 400


def test_request_ids_with_non_ascii_bytes_are_replaced_not_re_encoded(strict):
    r = httpx.get(strict.url + "/health", headers={"X-Request-ID": b"caf\xe9-1"})
    assert r.headers["x-request-id"].isascii() and len(r.headers["x-request-id"]) == 32
    assert httpx.get(strict.url + "/health", headers={"X-Request-ID": "cafe-1"}).headers["x-request-id"] == "cafe-1"


def test_transfer_encoding_with_content_length_is_refused_and_the_connection_closed(strict):
    answer = raw(strict, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\nTransfer-Encoding: chunked"
                         b"\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and b"Transfer-Encoding and Content-Length" in answer
    assert answer.count(b"HTTP/1.1 ") == 1  # the smuggled request behind it was not served
