"""Fail at start the way `fusion-train` does, with rank 0 slower than its peers (`same`) or with
only rank 1 failing while rank 0 trains on (`own`)."""

import os
import sys
import time

from fusion_train.train import failure

rank = int(os.environ["RANK"])
if sys.argv[1] == "same":
    time.sleep(2.0 if rank == 0 else 0.0)
    sys.exit(failure.fail_at_start(ValueError("the same error on every rank")))
if rank == 1:
    sys.exit(failure.fail_at_start(ValueError("an error of rank 1 alone")))
time.sleep(60)
