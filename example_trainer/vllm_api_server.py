"""The inference server's documented entry point (example_trainer/inference/server.py is the
server):

    python -m example_trainer.vllm_api_server --model M --port 9001 [any vLLM serve flag]
    python example_trainer/vllm_api_server.py --model M --port 9001
"""

import sys
from pathlib import Path

if not __package__:
    # NOTE: `python example_trainer/vllm_api_server.py` puts example_trainer/, not the repo
    # root, on sys.path; add the root so the package import below works in both launch modes.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from example_trainer.inference.server import main  # noqa: E402

if __name__ == "__main__":
    main()
