"""normfree.allocator: freed memory is kept for reuse, and the command applies it unless told not to."""
import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import torch
from normfree.allocator import configure_from_environment, retain_freed_memory
applied = {"retain": retain_freed_memory, "env": configure_from_environment, "none": lambda: None}[sys.argv[1]]()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.empty(16 * 2 ** 20).fill_(1.0)  # a 64 MiB block, touched once before counting
before = faults()
for _ in range(10):  # a training loop's pattern: the same large block, allocated and freed again and again
    torch.empty(16 * 2 ** 20).fill_(1.0)
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def run_probe(mode, **env):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={k: v for k, v in {**os.environ, **env}.items() if v is not None})
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_is_reused_without_page_faults():
    default = run_probe("none")
    retained = run_probe("retain")
    assert retained["applied"] is True
    block = 16 * 2 ** 20 * 4 // 4096  # pages of one 64 MiB block
    # glibc's default returns each block to the kernel: every allocation faults all its pages in again;
    # kept, the heap pages are reused (at most one more block's worth faulted while it settles)
    assert default["faults"] > 8 * block, default
    assert retained["faults"] <= 2 * block, (default, retained)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_environment_opt_out_keeps_the_default():
    assert run_probe("env", NORMFREE_SYSTEM_MALLOC="1")["applied"] is False
    opted_in = run_probe("env", NORMFREE_SYSTEM_MALLOC=None)
    assert opted_in["applied"] is True and opted_in["faults"] <= 2 * 16384
