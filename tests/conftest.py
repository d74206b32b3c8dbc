"""Test-wide settings.

The tests use tiny models, for which one intra-op thread is faster than
several, and which otherwise slow down sharply (spinning threads) when the
machine is shared. NORMFREE_TEST_THREADS overrides.

The ``normfree`` command changes the process's allocator settings
(:mod:`normfree.allocator`); tests that call it in-process keep the C
library's defaults, and ``tests/test_allocator.py`` checks the setting in
fresh processes.
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("NORMFREE_TEST_THREADS", "1")))
os.environ["NORMFREE_SYSTEM_MALLOC"] = "1"
