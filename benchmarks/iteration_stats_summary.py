"""Summarise the --log-iteration-stats JSON lines of a server log: step latency percentiles and a sampled trace."""
import json, sys, statistics
rows = []
for line in open(sys.argv[1]):
    i = line.find("{")
    if i < 0 or "Iteration Counter" not in line:
        continue
    try:
        rows.append(json.loads(line[i:]))
    except Exception:
        pass
print("iterations", len(rows))
if rows:
    keys = [k for k in rows[0] if "Latency" in k or "Waiting" in k or "Context Tokens" in k or "Generation Requests" in k or "Scheduled" in k]
    print(keys)
    lat = [r.get("Iteration Latency (ms)", 0) for r in rows]
    print("latency ms: p50 %.1f p90 %.1f p99 %.1f max %.1f sum %.1f s" % (statistics.median(lat), sorted(lat)[int(.9*len(lat))], sorted(lat)[int(.99*len(lat))], max(lat), sum(lat)/1e3))
    for step in range(0, len(rows), max(1, len(rows)//40)):
        r = rows[step]
        print({k: r.get(k) for k in keys})
