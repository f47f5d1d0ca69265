"""A contextual-bandit world, played through the project's own bandit code the way the
server and learner run it, beside Vowpal Wabbit's `cb_explore_adf --squarecb`.

The world: `--users` users with hidden tastes over 6 arms that have 4 attributes each.
A round picks a user uniformly; its request has a topic (0/1) that shows, flipped with
probability 0.15, as the conversation flag, and a prompt length that says nothing. The
chance that the response satisfies the user (a Bernoulli reward) is

    p = sigmoid(-1.5 + q_arm + 0.5 * attrs_arm . (taste_user + (2 topic - 1) shift_user))

q ~ N(0, 0.1), attrs, taste, shift ~ N(0, 1). Every policy sees the same rounds and
reward draws per seed. The rewards a policy learns from are the draw r in {0, 1}, or
2r - 1 (in [-1, 1]), or 0.3 r (one small implicit signal, like `copied` alone).

loraloop: service/strategy.py's StrategyChooser chooses (user's and population's
statistics, the arm, its propensity) on the context that service/server.py builds
(features.context_features); the learner's updates (learner/loop.py `_learn_bandit`:
user and population BanditState.update) reach it as events_pb2.BanditState records, as
they would over the `bandit-state` topic. Defaults: Settings() as they are now; old
defaults: the same numbers with the posterior as it was before the reward scale and the
context prior (`old_posterior`, copied here), whose scale is 1 (absolute noise).

Vowpal Wabbit: one model for all users, shared features user id, prompt length and
conversation flag, action features arm id and attributes, interactions user x arm,
context x arm and user x context x arm (-q UA -q CA --cubic UCA), cost = -reward.

Measures, per policy, reward variant and seed:
  share of oracle: the policy's expected reward over the last 20% of rounds divided by
    the oracle's, the oracle playing the best arm for the user and observed context
    (expected rewards: the success probabilities of the {0, 1} reward, for every
    variant alike);
  rounds to 80%: per user, over that user's own rounds, the moving mean of the chosen
    arms' expected reward over `--window` rounds divided by the oracle's over the same
    rounds; the first round (counted from the user's first, at least `--window`) where it
    reaches 0.8. Users who never do count as their number of rounds. Median over users.
Printed: mean over seeds and its 95% confidence interval (Student t), and the same of
the per-seed difference to VW's figure (same world and reward draws: paired), with the
number of seeds where the policy did better than VW.

    python benchmarks/bench_bandit_world.py            # 50 users, 20,000 rounds, 8 seeds
    python benchmarks/bench_bandit_world.py --small    # 20 users, 3,000 rounds, 2 seeds
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from unittest import mock

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from loraloop.core.bandits.features import DIM, context_features
from loraloop.core.bandits.linear import POPULATION, BanditState, Posterior
from loraloop.core.settings import Settings
from loraloop.service import strategy

ARMS = 6
ATTRIBUTES = 4
TOPIC_FLIP = 0.15
VW_ARGS = "--cb_explore_adf --squarecb -q UA -q CA --cubic UCA"
REWARDS: dict[str, Callable[[float], float]] = {
    "{0,1}": lambda r: r,
    "{-1,1}": lambda r: 2.0 * r - 1.0,
    "{0,0.3}": lambda r: 0.3 * r,
}
POLICIES = [
    "loraloop Thompson, new defaults",
    "loraloop LinUCB, new defaults",
    "loraloop Thompson, old defaults",
    "loraloop LinUCB, old defaults",
    "VW squarecb",
    "uniform random",
]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


@dataclass
class World:
    """One seed's rounds: who asks, the context, every arm's success chance, the draws."""

    users: np.ndarray  # [T] user index
    prompt_tokens: np.ndarray  # [T]
    conversation: np.ndarray  # [T] bool: the observed (noisy) topic
    p: np.ndarray  # [T, ARMS] success probability given the user and observed context
    draws: np.ndarray  # [T] uniform: the reward of arm a is 1 when draws < p[:, a]
    attrs: np.ndarray  # [ARMS, ATTRIBUTES]


def make_world(seed: int, users: int, rounds: int) -> World:
    """The world of one seed (see the module docstring)."""
    rng = np.random.default_rng(seed)
    attrs = rng.normal(size=(ARMS, ATTRIBUTES))
    quality = -1.5 + rng.normal(0, 0.1, size=ARMS)
    taste = rng.normal(size=(users, ATTRIBUTES))
    shift = rng.normal(size=(users, ATTRIBUTES))
    who = rng.integers(users, size=rounds)
    topic = rng.integers(2, size=rounds)
    seen = np.where(rng.random(rounds) < TOPIC_FLIP, 1 - topic, topic)
    tokens = rng.integers(1, 400, size=rounds)

    def chance(t: np.ndarray) -> np.ndarray:
        logit = quality + 0.5 * (taste[who] + (2 * t[:, None] - 1) * shift[who]) @ attrs.T
        return 1.0 / (1.0 + np.exp(-logit))

    p = (1 - TOPIC_FLIP) * chance(seen) + TOPIC_FLIP * chance(1 - seen)
    return World(who, tokens, seen.astype(bool), p, rng.random(rounds), attrs)


def old_posterior(
    user: BanditState | None,
    population: BanditState | None,
    arms: list[str],
    dim: int,
    prior_strength: float = 5.0,
    ridge: float = 1.0,
) -> Posterior:
    """linear.posterior before the reward scale and context prior: ridge toward 0 on
    every coefficient, scale 1 (the noise setting is in reward units)."""
    means, covs = [], []
    for arm in arms:
        a_mat = ridge * np.eye(dim)
        b_vec = np.zeros(dim)
        pop = population.stats.get(arm) if population else None
        if pop is not None and pop.n:
            w = min(1.0, prior_strength / pop.n)
            a_mat = a_mat + w * pop.xtx
            b_vec = b_vec + w * pop.xtr
        own = user.stats.get(arm) if user else None
        if own is not None and own.n:
            a_mat = a_mat + own.xtx
            b_vec = b_vec + own.xtr
        inv = np.linalg.inv(a_mat)
        means.append(inv @ b_vec)
        covs.append(inv)
    return Posterior(np.array(means), np.array(covs))


class Loraloop:
    """The server's chooser fed by the learner's updates, as records of `bandit-state`."""

    def __init__(self, arms_file: Path, bandit: str, seed: int) -> None:
        self.settings = Settings(arms_file=arms_file, bandit=bandit)
        self.chooser = strategy.StrategyChooser(self.settings)  # its follower never starts
        self.chooser._rng = np.random.default_rng(seed)
        self.names = self.chooser.names
        self.users: dict[str, BanditState] = {}
        self.population = BanditState(self.names, DIM)

    def choose(self, user: str, x: np.ndarray) -> tuple[int, float]:
        choice = self.chooser.choose(user, x)
        return self.names.index(choice.arm.name), choice.propensity

    def learn(self, user: str, arm: int, x: np.ndarray, reward: float) -> None:
        state = self.users.setdefault(user, BanditState(self.names, DIM))
        state.update(self.names[arm], x, reward)
        self.population.update(self.names[arm], x, reward)
        for key, s in ((user, state), (POPULATION, self.population)):
            record = s.to_proto(key, 0).SerializeToString()
            self.chooser._apply(self.settings.topic_bandit_state, key.encode(), record)


class VowpalWabbit:
    """`cb_explore_adf --squarecb`: one model, user id and context as shared features."""

    def __init__(self, world: World, seed: int) -> None:
        from vowpalwabbit import Workspace  # type: ignore[import-untyped]

        self.vw = Workspace(f"{VW_ARGS} --quiet --random_seed {seed}")
        self.rng = np.random.default_rng(seed)
        self.actions = [
            f"|A arm{a} " + " ".join(f"f{i}:{v:.5f}" for i, v in enumerate(world.attrs[a]))
            for a in range(ARMS)
        ]
        self._pmf = np.full(ARMS, 1.0 / ARMS)

    def _shared(self, user: str, x: np.ndarray) -> str:
        return f"shared |U {user} |C len:{x[1]:.5f} chat:{x[2]:.0f}"

    def choose(self, user: str, x: np.ndarray) -> tuple[int, float]:
        pmf = np.maximum(np.asarray(self.vw.predict([self._shared(user, x), *self.actions])), 0)
        self._pmf = pmf / pmf.sum()
        arm = int(self.rng.choice(ARMS, p=self._pmf))
        return arm, float(self._pmf[arm])

    def learn(self, user: str, arm: int, x: np.ndarray, reward: float) -> None:
        label = f"0:{-reward}:{self._pmf[arm]} "
        lines = [(label if a == arm else "") + line for a, line in enumerate(self.actions)]
        self.vw.learn([self._shared(user, x), *lines])


class Uniform:
    """Every arm equally likely."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def choose(self, user: str, x: np.ndarray) -> tuple[int, float]:
        return int(self.rng.integers(ARMS)), 1.0 / ARMS

    def learn(self, user: str, arm: int, x: np.ndarray, reward: float) -> None:
        pass


@contextmanager
def old_code(policy: str) -> Iterator[None]:
    """The old posterior in the server's chooser, for the 'old defaults' policies."""
    if "old defaults" in policy:
        with mock.patch.object(strategy, "posterior", old_posterior):
            yield
    else:
        yield


def play(policy: str, world: World, seed: int, reward: str, arms_file: Path) -> np.ndarray:
    """Expected reward (success probability) of every round's chosen arm."""
    agent: Loraloop | VowpalWabbit | Uniform
    if policy.startswith("loraloop"):
        agent = Loraloop(arms_file, "linucb" if "LinUCB" in policy else "thompson", seed)
    elif policy.startswith("VW"):
        agent = VowpalWabbit(world, seed)
    else:
        agent = Uniform(seed)
    to_reward = REWARDS[reward]
    got = np.zeros(len(world.users))
    with old_code(policy):
        for t, u in enumerate(world.users):
            user = f"u{u}"
            x = context_features(int(world.prompt_tokens[t]), bool(world.conversation[t]))
            arm, propensity = agent.choose(user, x)
            assert 0 < propensity <= 1
            success = 1.0 if world.draws[t] < world.p[t, arm] else 0.0
            agent.learn(user, arm, x, to_reward(success))
            got[t] = world.p[t, arm]
    return got


def share_of_oracle(world: World, got: np.ndarray) -> float:
    """Expected reward over the last 20% of rounds, relative to the oracle's."""
    last = slice(int(0.8 * len(got)), len(got))
    return float(got[last].sum() / world.p.max(axis=1)[last].sum())


def rounds_to_80(world: World, got: np.ndarray, window: int) -> float:
    """Median over users of the first own round whose moving mean reaches 80% of the
    oracle's (a user who never does counts as their number of rounds)."""
    best = world.p.max(axis=1)
    firsts = []
    for u in np.unique(world.users):
        idx = np.flatnonzero(world.users == u)
        ones = np.ones(window)
        hit = np.flatnonzero(
            np.convolve(got[idx], ones, "valid") >= 0.8 * np.convolve(best[idx], ones, "valid")
        )
        firsts.append(int(hit[0]) + window if len(hit) else len(idx))
    return float(np.median(firsts))


@dataclass(frozen=True)
class Job:
    policy: str
    reward: str
    seed: int
    users: int
    rounds: int
    window: int
    arms_file: Path


def run_job(job: Job) -> tuple[str, str, int, float, float, float]:
    """(policy, reward, seed, share of oracle, rounds to 80%, seconds)."""
    start = time.perf_counter()
    world = make_world(job.seed, job.users, job.rounds)
    got = play(job.policy, world, job.seed, job.reward, job.arms_file)
    return (
        job.policy,
        job.reward,
        job.seed,
        share_of_oracle(world, got),
        rounds_to_80(world, got, job.window),
        time.perf_counter() - start,
    )


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    t = T_975.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def world_summary(seeds: int, users: int, rounds: int) -> str:
    """The oracle's mean reward and the shares of a context-free oracle and of chance."""
    oracle, free, chance = [], [], []
    for seed in range(seeds):
        w = make_world(seed, users, rounds)
        best = w.p.max(axis=1)
        oracle.append(best.mean())
        chance.append(w.p.mean() / best.mean())
        own = [w.p[w.users == u] for u in range(users)]
        free.append(sum(p[:, p.mean(0).argmax()].sum() for p in own if len(p)) / best.sum())
    return (
        f"oracle's mean reward {statistics.fmean(oracle):.3f}; share of the best arm per user "
        f"ignoring the context {statistics.fmean(free):.3f}; of uniform choice "
        f"{statistics.fmean(chance):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="20 users, 3,000 rounds, 2 seeds")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--window", type=int, default=25, help="moving mean of rounds to 80%%")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--policies", nargs="*", default=POLICIES, choices=POLICIES)
    parser.add_argument("--rewards", nargs="*", default=list(REWARDS), choices=list(REWARDS))
    ns = parser.parse_args()
    if ns.small:
        ns.users, ns.rounds, ns.seeds = 20, 3000, 2
    console = Console(width=150)
    with tempfile.TemporaryDirectory() as tmp:
        arms_file = Path(tmp) / "arms.toml"
        arms_file.write_text("".join(f'[[arm]]\nname = "arm{a}"\n\n' for a in range(ARMS)))
        jobs = [
            Job(p, r, s, ns.users, ns.rounds, ns.window, arms_file)
            for s in range(ns.seeds)
            for r in ns.rewards
            for p in ns.policies
        ]
        results: dict[tuple[str, str], dict[int, tuple[float, float]]] = defaultdict(dict)
        seconds = 0.0
        with Pool(ns.jobs) as pool:
            for policy, reward, seed, share, reach, took in tqdm(
                pool.imap_unordered(run_job, jobs), total=len(jobs), desc="runs"
            ):
                results[(policy, reward)][seed] = (share, reach)
                seconds += took
    table = Table(
        title=f"{ns.users} users, {ns.rounds:,} rounds, {ARMS} arms, seeds 0..{ns.seeds - 1}"
    )
    columns = ["policy", "reward", "share of oracle, last 20%", "rounds/user to 80%"]
    peer = "VW squarecb" if "VW squarecb" in ns.policies else None
    if peer:
        columns += ["share - VW's (paired)", "rounds - VW's (paired)"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("policy", "reward") else "right")
    for reward in ns.rewards:
        for policy in ns.policies:
            runs = results[(policy, reward)]
            (sm, sh), (rm, rh) = (mean_ci([run[i] for run in runs.values()]) for i in (0, 1))
            row = [policy, reward, f"{sm:.3f} ± {sh:.3f}", f"{rm:.0f} ± {rh:.0f}"]
            if peer:
                vw = results[(peer, reward)]
                for i, fmt, sign in ((0, "{:+.3f} ± {:.3f}", 1), (1, "{:+.0f} ± {:.0f}", -1)):
                    diffs = [runs[s][i] - vw[s][i] for s in runs]
                    wins = sum(sign * d > 0 for d in diffs)
                    text = f"{fmt.format(*mean_ci(diffs))} ({wins}/{len(diffs)} better)"
                    row.append(text if policy != peer else "")
            table.add_row(*row)
        table.add_section()
    console.print(table)
    console.print(world_summary(ns.seeds, ns.users, ns.rounds))
    console.print(f"VW: {VW_ARGS}; {seconds:.0f} s of runs in {ns.jobs} processes")


if __name__ == "__main__":
    main()
