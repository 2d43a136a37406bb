"""schemathesis against api/openapi.yaml and a running dsv4d: bounded examples; no 5xx, every
response conforms to the documented status codes, content types and schemas."""
import os
import subprocess
import sys

from conftest import COMMON
from dsv4d_proc import Server

SPEC = os.environ.get("DSV4D_OPENAPI") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "api", "openapi.yaml")


def test_schemathesis(tmp_path):
    # short context and timeout: whatever is generated, each generation stays cheap
    s = Server("--max-model-len", "64", "--max-num-seqs", "32", "--log-level", "warning",
               "--request-timeout", "20")
    try:
        st = os.path.join(os.path.dirname(sys.executable), "schemathesis")
        cmd = [st, "run", SPEC, "--url", s.url, "--max-examples",
               os.environ.get("DSV4D_SCHEMA_EXAMPLES", "25"), "--seed", "1",
               "--checks", "not_a_server_error,status_code_conformance,"
               "content_type_conformance,response_schema_conformance",
               "--phases", "examples,fuzzing", "--request-timeout", "60", "--workers", "2",
               "--no-color", "--suppress-health-check", "all"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        print(r.stdout[-6000:], r.stderr[-3000:])
        assert r.returncode == 0
        assert s.proc.poll() is None, "\n".join(s.log[-40:])
    finally:
        assert s.stop() == 0
