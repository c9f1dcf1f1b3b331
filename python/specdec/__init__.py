"""specdec: exact speculative decoding served over gRPC."""

import os

# torch's OpenMP workers spin for milliseconds after each op by default. Between the tiny torch ops of a
# decode step they then hold both cores while the small-M linear kernel's own threads need them:
# measured on 2 cores, a Qwen2.5-0.5B draft step took 97 ms with spinning and 62-65 ms without, and a
# 1.5B verify over 8 tokens 580 ms against 365-375 ms. It must be set before torch loads OpenMP, hence
# here, before anything imports torch; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
