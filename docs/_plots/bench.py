"""The Performance page's figure, drawn at build time from benchmarks/results/results.json
(the file `make bench` writes): every peer's steady throughput as a ratio to a
serial loop, median and range of the run-by-run ratios, per workload."""
import json
import os

import matplotlib.pyplot as plt

# Run by matplotlib's plot directive from docs/_plots (its working directory).
HERE = os.path.dirname(os.path.abspath(globals().get("__file__", "bench.py")))
RESULTS = os.path.join(HERE, "..", "..", "benchmarks", "results", "results.json")
with open(RESULTS) as f:
    results = json.load(f)

NAMES = {"ceiling": "parallel ceiling", "tf_map": "tf.data map AUTOTUNE",
         "keras_pydataset": "Keras PyDataset", "torch_spawn": "PyTorch spawn",
         "torch_fork": "PyTorch fork", "grain": "Grain", "mploader": "mploader (loop)",
         "mploader_unordered": "mploader (unordered)", "mploader_tf": "mploader .dataset()"}
sections = [s for s in ("a", "b") if s in results["sections"]]
fig, axes = plt.subplots(1, len(sections), figsize=(5.2 * len(sections), 3.9), squeeze=False)
for ax, key in zip(axes[0], sections):
    section = results["sections"][key]
    peers = [p for p in section["peers"] if p != "serial"]
    medians = [section["peers"][p]["x_baseline"] for p in peers]
    low = [m - section["peers"][p]["x_baseline_min"] for p, m in zip(peers, medians)]
    high = [section["peers"][p]["x_baseline_max"] - m for p, m in zip(peers, medians)]
    colors = ["#2a7ab9" if p.startswith("mploader") else "#9aa5b1" for p in peers]
    y = range(len(peers))
    ax.barh(y, medians, xerr=[low, high], color=colors, capsize=3)
    ax.set_yticks(list(y), [NAMES.get(p, p) for p in peers])
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("steady items/s, x a serial loop (median, range)")
    ax.set_title(f"({key}) {section['title'].split('(')[0].strip()}, "
                 f"{section['workers']} workers", fontsize=10)
machine = results["machine"]
fig.suptitle(f"make bench on {machine['cpu']}, {machine['cores_usable']} cores usable, "
             f"Python {machine['python']}, {section['reps']} interleaved runs", fontsize=10)
fig.tight_layout()
