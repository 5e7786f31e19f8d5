"""scripts/loadtest.py in its short form: 16 clients for 30 s of mixed, abusive and hostile traffic against the
default model."""

import json
import subprocess
import sys

import httpx

from tests.conftest import ROOT


def test_twenty_seconds_of_mixed_traffic_lose_nothing(default_server):
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--url", default_server.url,
                          "--clients", "16", "--seconds", "20"], capture_output=True, text=True, timeout=600)
    report = json.loads(run.stdout)
    print(json.dumps(report, indent=1, ensure_ascii=False))
    assert report["5xx"] == 0 and report["server_5xx"] == 0 and report["lost"] == 0, report["problems"]
    assert report["sent"] == report["completed"] + report["left_mid_stream"] + report["lost"]
    assert set(report["kinds"]) == {"malformed", "over-long prompt", "beam", "structured", "leaves mid-stream",
                                    "sampled", "greedy", "hostile", "hangs up mid-body", "slow reader"}
    assert report["status"].get("200", 0) > 15 and report["status"].get("400", 0) > 0
    assert report["memory_after_mib"] - report["memory_before_mib"] < 512
    assert run.returncode == 0
    health = httpx.get(default_server.url + "/health").json()
    assert health["status"] == "ok"
