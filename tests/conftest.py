import os
import random
import sys
import zlib

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Fresh random inputs every run; TEST_SEED=<n> replays a run.
SEED = int(os.environ.get("TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"TEST_SEED={SEED} (set it to replay these random inputs)"


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))
