import os, glob, collections, re, tempfile, shutil
import jax
from jax._src.lib import _profile_data
def thunk_profile(jf, args, iters=3, top=25, show=True):
    """jf: jitted fn. Returns per-thunk ms/iter (summed over threads) with a short HLO description."""
    run = lambda: jax.block_until_ready(jf(*args))
    run(); run()
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(iters): run()
    pb = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]
    pdata = _profile_data.ProfileData.from_file(pb)
    agg = collections.Counter()
    for plane in pdata.planes:
        for line in plane.lines:
            for ev in line.events:
                agg[ev.name] += ev.duration_ns
    shutil.rmtree(d)
    txt = jf.lower(*args).compile().as_text()
    desc = {}
    for l in txt.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(", l)
        if m:
            meta = re.search(r'op_name="([^"]+)"', l)
            desc[m.group(1)] = f"{m.group(3)} {m.group(2)[:36]} {meta.group(1)[-60:] if meta else ''}"
    rows = [(v / iters / 1e6, n, desc[n]) for n, v in agg.items() if n in desc]
    rows.sort(reverse=True)
    if show:
        for ms, n, dsc in rows[:top]:
            print(f"   {ms:8.2f} ms  {n:28s} {dsc}")
        print(f"   total thunks {sum(r[0] for r in rows):.1f} ms/it")
    return rows
