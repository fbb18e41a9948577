"""Shared test settings.

The tests use tiny tensors, for which torch's intra-op threads cost more in synchronisation than they
gain (measured: a DOP853 reference solve took 0.1 s on one thread and up to 7 s on two threads of a
loaded 2-core machine), so the whole suite runs single-threaded."""

import torch

torch.set_num_threads(1)
