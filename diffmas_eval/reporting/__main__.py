"""`python -m diffmas_eval.reporting RESULTS_DIR ... --out DIR`."""

from diffmas_eval.reporting.cli import main

raise SystemExit(main())
