"""Plot reward and loss of a run:

    python -m example_trainer.plot run/metrics.jsonl [-o out.png]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


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


def reward_curves_png(curves: dict[str, list[float]], png: Path, title: str, ylabel: str,
                      bold: tuple[str, ...] = ()) -> Path | None:
    """One PNG of several runs' mean reward per step, keyed by legend label (benchmarks that
    compare runs); None, with a log line, where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        log.info("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    colors = plt.get_cmap("tab20")
    for i, (label, curve) in enumerate(curves.items()):
        color = colors((2 * i + i // 10) % 20)  # ten distinct hues, then their light shades
        ax.plot(range(1, len(curve) + 1), curve, color=color,
                lw=2.5 if label in bold else 1.5, label=label)
    ax.set(xlabel="step", ylabel=ylabel, ylim=(-0.02, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("jsonl", type=Path, help="metrics.jsonl written by grpo.py")
    parser.add_argument("-o", "--out", type=Path, help="PNG path (default: beside the JSONL)")
    args = parser.parse_args()
    print(plot(args.jsonl, args.out or args.jsonl.with_suffix(".png")))  # noqa: T201


if __name__ == "__main__":
    main()
