"""Cost of an API-key lookup against the number of configured keys.

`ApiKeys.lookup` hashes the presented key once (SHA-256) and compares the digest with every
configured one in constant time, so a call with a wrong key costs as much as one with the
last key listed. Prints microseconds per lookup for a known and an unknown key.

    python benchmarks/bench_auth.py                    # 1, 100, 1000, 10000 keys
    python benchmarks/bench_auth.py --keys 1 50 --rounds 20000
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraloop.service.auth import ApiKeys


def per_lookup_us(keys: ApiKeys, key: str, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        keys.lookup(key)
    return (time.perf_counter() - started) / rounds * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=2000, help="lookups timed per figure")
    args = parser.parse_args()
    print(f"{'keys':>7} {'known key (last listed)':>24} {'unknown key':>12}")
    for n in args.keys:
        listed = [f"k{i:05d}-{secrets.token_urlsafe(18)}" for i in range(n)]
        keys = ApiKeys.parse(";".join(f"{k}=user{i}" for i, k in enumerate(listed)))
        if keys.lookup(listed[-1]) is None:
            raise SystemExit("the last key listed was not found: lookup is broken")
        rounds = max(20, args.rounds // max(1, n // 100))  # keep big key lists quick
        known = per_lookup_us(keys, listed[-1], rounds)
        unknown = per_lookup_us(keys, "nope-" + secrets.token_urlsafe(18), rounds)
        print(f"{n:>7} {known:>21.1f} us {unknown:>9.1f} us")


if __name__ == "__main__":
    main()
