"""`python -m fusion_train.train [OVERRIDES...]`: the same as `fusion-train`, for `torchrun -m`."""

import sys

from fusion_train.cli import train_main

sys.exit(train_main())
