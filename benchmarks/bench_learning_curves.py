"""Learning curves of each learning setup on the demo world, through the real stack.

Each setup runs the demo (Kafka, `loraloop serve`, `loraloop learn`, simulated users with
hidden tastes over the demo world's style attributes) and records reward per interaction;
the same prompts are also served to a base-model twin, so every run carries its own
baseline. Prints a table of mean
reward at checkpoints and interactions to reach 80 % of the best achievable reward, and
saves the curves as a plot.

    python benchmarks/bench_learning_curves.py [--users 6 --rounds 100]   # ~2 min per setup
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraloop.demo import DEMO_ARMS, run_world

SETUPS: dict[str, dict[str, object]] = {
    "LoRA REINFORCE only": {"arms_file": None},
    "Thompson bandit + LoRA": {"arms_file": DEMO_ARMS, "bandit": "thompson"},
    "LinUCB bandit + LoRA": {"arms_file": DEMO_ARMS, "bandit": "linucb"},
}


def mean_curve(per_user: dict[str, list[float]]) -> list[float]:
    rounds = len(next(iter(per_user.values())))
    return [statistics.mean(s[i] for s in per_user.values()) for i in range(rounds)]


def smooth(series: list[float], window: int = 10) -> list[float]:
    return [statistics.mean(series[max(0, i - window + 1) : i + 1]) for i in range(len(series))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--out", default="out/bench-learning")
    ns = parser.parse_args()
    out = Path(ns.out)
    curves: dict[str, list[float]] = {}
    for name, overrides in SETUPS.items():
        code, rewards = run_world(ns.users, ns.rounds, out / name.split()[0].lower(), overrides)
        if code:
            raise SystemExit(f"{name}: the run failed")
        curves[name] = mean_curve(rewards["personalized"])
        curves.setdefault("base model (same prompts)", mean_curve(rewards["base"]))
    marks = [m for m in (10, 20, 30, 50, 100, 150) if m <= ns.rounds]
    print(f"\nmean reward over users (window of 10 up to the mark), {ns.users} users:")
    print(f"{'setup':28s}" + "".join(f"{m:>7d}" for m in marks) + "   to 0.8")
    for name, curve in curves.items():
        sm = smooth(curve)
        reach = next((i + 1 for i, v in enumerate(sm) if v >= 0.8), None)
        cells = "".join(f"{sm[m - 1]:7.2f}" for m in marks)
        print(f"{name:28s}{cells}   {reach if reach else '-'}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), smooth(curve), label=name, linewidth=2)
    ax.set_xlabel("interaction")
    ax.set_ylabel("reward (moving mean of 10, mean of users)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("Learning curves on the demo world")
    fig.tight_layout()
    path = out / "learning-curves.png"
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
