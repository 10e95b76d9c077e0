"""`python -m ddcm_jax.cli`: the `ddcm` console script."""

import sys

from ddcm_jax.cli import main

sys.exit(main())
