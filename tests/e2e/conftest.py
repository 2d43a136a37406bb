import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dsv4d_proc import Server  # noqa: E402

# A small context keeps every generation cheap on the CPU tiny model.
COMMON = ["--max-model-len", "1024", "--max-num-seqs", "32", "--max-num-batched-tokens", "128",
          "--log-level", "warning"]


@pytest.fixture(scope="module")
def server():
    s = Server(*COMMON)
    yield s
    rc = s.stop()
    assert rc == 0, "\n".join(s.log[-40:])


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id
