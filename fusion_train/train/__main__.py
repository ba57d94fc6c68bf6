"""`python -m fusion_train.train [--config-dir DIR] [OVERRIDES...]`: one training run, for `torchrun -m`."""

import sys

from fusion_train.train.run import main

sys.exit(main())
