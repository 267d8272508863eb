"""`python -m diffmas_eval.training` = `diffmas-train`."""

import sys

from diffmas_eval.training.cli import main

sys.exit(main())
