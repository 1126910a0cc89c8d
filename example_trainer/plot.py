"""Plot reward and loss of a run:

    python -m example_trainer.plot run/metrics.jsonl [-o out.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(jsonl: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{jsonl} has no rows: did the run log any step?")
    steps = [r["step"] for r in rows]
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    ax_r.plot(steps, [r["reward/mean"] for r in rows])
    ax_r.set(xlabel="step", ylabel="mean reward", title="reward")
    ax_l.plot(steps, [r["loss/total"] for r in rows])
    ax_l.set(xlabel="step", ylabel="loss", title="loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("jsonl", type=Path, help="metrics.jsonl written by grpo.py")
    parser.add_argument("-o", "--out", type=Path, help="PNG path (default: beside the JSONL)")
    args = parser.parse_args()
    print(plot(args.jsonl, args.out or args.jsonl.with_suffix(".png")))  # noqa: T201


if __name__ == "__main__":
    main()
