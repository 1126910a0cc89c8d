"""GRPO trainer CLI: `python example_trainer/grpo.py --model-name M --weight-bridge-mode MODE ...`.

Every flag is documented in `--help`; see example_trainer/config.py for the dataclass behind them.
"""

from __future__ import annotations

import logging
import sys

from example_trainer.config import parse_config
from example_trainer.process import raise_on_sigterm

log = logging.getLogger("grpo")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(argv)
    from example_trainer.trainer import train  # heavy imports after the CLI is parsed

    raise_on_sigterm()  # a SIGTERM still closes the bridge: mode none stops its vLLM
    try:
        train(cfg)
    except KeyboardInterrupt:
        log.info("interrupted; the bridge is closed (checkpoints up to the last save are kept)")
        sys.exit(130)


if __name__ == "__main__":
    main()
