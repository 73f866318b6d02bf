"""Test-wide settings."""

import torch

# Tiny models gain nothing from intra-op threads, and on a 2-core machine two threads per
# process stall badly when anything else runs (subprocess tests, DDP workers).
torch.set_num_threads(1)
