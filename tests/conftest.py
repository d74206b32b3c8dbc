"""Test-wide settings.

The tests use tiny models, for which one intra-op thread is faster than
several, and which otherwise slow down sharply (spinning threads) when the
machine is shared. NORMFREE_TEST_THREADS overrides.
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("NORMFREE_TEST_THREADS", "1")))
