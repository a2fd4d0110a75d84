import time, statistics, os
def interleave(fns, rounds=7, warm=2):
    """fns: name -> callable (blocking). Times one call of each per round, rotating the order; returns medians (s)."""
    names = list(fns)
    for n in names:
        for _ in range(warm):
            fns[n]()
    t = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter(); fns[n](); t[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in t.items()}, {n: min(v) for n, v in t.items()}
def load():
    return os.getloadavg()
