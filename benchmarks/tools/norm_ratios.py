"""How far honest clients' update norms spread around their round's median (the evidence
behind the cohort norm bound's default, ``norm_bound = 10`` per local batch).

    python benchmarks/tools/norm_ratios.py            # the two quantity-skewed jobs of RESULTS.md

Each client's update ||w_k - w_global|| (floating parameters, BatchNorm statistics aside,
as the server computes it) is divided by 1 (raw), by its local batches ceil(n_k / B), or by
their square root; max/median and min/median per round are printed. No client is refused
(norm_bound none) so every honest update is seen.
"""
import math
import statistics

from fedsq_fast.federation import Federation, from_mapping
from fedsq_fast.federation.adapter import payload_state
from fedsq_fast.federation.prepare import prepare_data
from fedsq_fast.federation.strategy import _sq_dist

JOBS = [dict(partition="quantity", alpha=0.1, rounds=3),
        dict(partition="quantity", alpha=0.1, rounds=2, local_epochs=3, batch_size=16, lr=0.02)]


def main():
    for over in JOBS:
        for method in ("fedavg", "fedsq"):
            cfg = from_mapping({**over, "methods": [method], "norm_bound": None, "checkpoint": False})
            data = prepare_data(cfg)
            seen, glob = {}, {}

            def hook(rnd, cid, state):
                seen.setdefault(rnd, []).append((len(data.parts[cid]), math.sqrt(_sq_dist(state, glob))))
                return state
            fed = Federation(cfg, method, data, client_hook=hook, quiet=True)
            sizes = sorted(len(p) for p in data.parts)
            for r in range(1, cfg.rounds + 1):
                glob.clear()
                glob.update({k: v.clone() for k, v in payload_state(fed.model).items()})
                fed.run_round(r)
                for name, f in (("raw", lambda n: 1), ("per batch", lambda n: math.ceil(n / cfg.batch_size)),
                                ("per sqrt(batches)", lambda n: math.sqrt(math.ceil(n / cfg.batch_size)))):
                    v = [x / f(n) for n, x in seen[r]]
                    med = statistics.median(v)
                    print(f"{over} {method} round {r} {name}: max/median {max(v) / med:.2f}, "
                          f"min/median {min(v) / med:.2f} (client sizes {sizes[0]}..{sizes[-1]})")


if __name__ == "__main__":
    main()
