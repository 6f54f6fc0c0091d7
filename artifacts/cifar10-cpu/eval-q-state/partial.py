import json, sys
for f in sys.argv[1:]:
    s = json.load(open(f))["sections"]
    att = [v for k, v in s.items() if k.startswith("main/pgd")][0]
    done = att["done"]
    n = sum(len(b["vote"]) for b in done.values())
    out = {k: sum(sum(b[k]) for b in done.values()) for k in done["0"] if isinstance(done["0"][k], list)}
    n_att = len(att["targets"])
    print(f, f"batches {len(done)}, attacked so far {n} of {n_att}; robust among them:",
          {k: f"{v:.1f}/{n} -> est. {v / n * n_att / 256:.1%} of 256" for k, v in out.items()})
