"""`diffmas-train --config CONFIG.yaml [--field value ...]` (also `python -m diffmas_eval.training`, and under
`accelerate launch -m diffmas_eval.training ...` for several processes)."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the config (YAML + command-line overrides), train, print the adapter directory."""
    from diffmas_eval.training.config import parse_args

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(argv)
        from diffmas_eval.training.trainer import train

        output = train(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"diffmas-train: error: {error}", file=sys.stderr)
        return 2
    print(output)
    return 0
