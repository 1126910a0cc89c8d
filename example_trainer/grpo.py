"""GRPO trainer CLI: `python example_trainer/grpo.py --model-name M --weight-bridge-mode MODE ...`.

Every flag is documented in `--help`; see example_trainer/config.py for the dataclass behind them.
"""

from __future__ import annotations

import logging

from example_trainer.config import parse_config


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(argv)
    from example_trainer.trainer import train  # heavy imports after the CLI is parsed

    train(cfg)


if __name__ == "__main__":
    main()
