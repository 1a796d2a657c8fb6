#!/usr/bin/env python3
"""Draws a training run's metrics file (JSON lines from moe::MetricsWriter, include/moecore/training.h).

    plot_metrics.py METRICS.jsonl --out-dir DIR    writes DIR/loss.png and DIR/expert_load.png
    plot_metrics.py --smoke [--out-dir DIR]        plots a generated tiny metrics file and checks the PNGs

loss.png: the training lm loss per logged iteration with the validation loss over it, and below it the
MoE losses the log line reports (load_balancing_loss, seq_load_balancing_loss, z_loss, ...).
expert_load.png: one heatmap per MoE layer: for each logged step (x) and expert (y) the tokens the
expert received divided by the mean over the layer's experts (1 = perfectly balanced).

Records read (others are ignored):
    {"type": "train", "iteration": 10, "lm_loss": 3.4, "losses": {"lm loss": 3.4, "z_loss": 0.1}, ...}
    {"type": "validation", "iteration": 10, "lm_loss": 3.1, ...}
    {"type": "moe_layer", "iteration": 10, "layer": 0, "tokens_per_expert": [..], "load_cv": 0.2, ...}

Needs matplotlib (Debian: python3-matplotlib); without it the script exits 77 (CTest: skipped).
"""

import argparse
import json
import math
import os
import sys
import tempfile

SKIP = 77


def load_records(path):
    """The file's records, in order. A torn last line (a run killed mid-write) is dropped with a
    warning; any other bad line is an error naming the line."""
    records = []
    with open(path, "r", encoding="utf-8") as f:
        lines = f.read().split("\n")
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    for i, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                print(f"plot_metrics: {path}:{i + 1}: dropping an incomplete last line ({e})", file=sys.stderr)
                continue
            raise SystemExit(f"plot_metrics: {path}:{i + 1}: not a JSON line: {e}")
        if not isinstance(rec, dict):
            raise SystemExit(f"plot_metrics: {path}:{i + 1}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def split_records(records):
    train = [r for r in records if r.get("type") == "train" and "iteration" in r]
    valid = [r for r in records if r.get("type") == "validation" and "iteration" in r]
    layers = {}
    for r in records:
        if r.get("type") == "moe_layer" and "iteration" in r and "layer" in r:
            layers.setdefault(int(r["layer"]), []).append(r)
    return train, valid, layers


def plot_loss(plt, train, valid, out_path, title):
    moe_names = []
    for r in train:
        for name in (r.get("losses") or {}):
            if name != "lm loss" and name not in moe_names:
                moe_names.append(name)
    rows = 2 if moe_names else 1
    fig, axes = plt.subplots(rows, 1, figsize=(9, 3.6 * rows), sharex=True, squeeze=False)
    ax = axes[0][0]
    it = [r["iteration"] for r in train if finite(r.get("lm_loss"))]
    lm = [r["lm_loss"] for r in train if finite(r.get("lm_loss"))]
    if it:
        ax.plot(it, lm, color="tab:blue", linewidth=1.4, label="train lm loss")
    vit = [r["iteration"] for r in valid if finite(r.get("lm_loss"))]
    vl = [r["lm_loss"] for r in valid if finite(r.get("lm_loss"))]
    if vit:
        ax.plot(vit, vl, color="tab:orange", marker="o", markersize=4, linewidth=1.2, label="validation lm loss")
    if not it and not vit:
        ax.text(0.5, 0.5, "no lm loss logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("lm loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if it or vit:
        ax.legend(loc="upper right")
    if moe_names:
        ax2 = axes[1][0]
        for name in moe_names:
            pts = [(r["iteration"], r["losses"][name]) for r in train
                   if finite((r.get("losses") or {}).get(name))]
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1.2, label=name)
        ax2.set_ylabel("MoE losses (unscaled)")
        ax2.grid(True, alpha=0.3)
        ax2.legend(loc="upper right")
    axes[-1][0].set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_expert_load(plt, layers, out_path, title):
    import numpy as np

    if not layers:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no moe_layer records", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
        fig.savefig(out_path, dpi=110)
        plt.close(fig)
        return
    ids = sorted(layers)
    ncols = 1 if len(ids) <= 3 else 2 if len(ids) <= 8 else 4
    nrows = (len(ids) + ncols - 1) // ncols
    num_experts = max(len(r.get("tokens_per_expert") or []) for recs in layers.values() for r in recs)
    height = min(4.5, max(2.2, 1.2 + 0.1 * num_experts))
    width = 6.5 if ncols == 1 else 5.0
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols + 1.2, height * nrows + 0.6), squeeze=False,
                             layout="constrained")
    vmax = 0.0
    grids = {}
    for lid in ids:
        recs = sorted(layers[lid], key=lambda r: r["iteration"])
        cols = []
        for r in recs:
            load = np.asarray(r.get("tokens_per_expert") or [], dtype=float)
            mean = load.mean() if load.size else 0.0
            col = load / mean if mean > 0 else np.zeros_like(load)
            cols.append(np.pad(col, (0, num_experts - col.size), constant_values=np.nan))
        grid = np.stack(cols, axis=1) if cols else np.zeros((num_experts, 0))
        grids[lid] = (grid, [r["iteration"] for r in recs], recs)
        if grid.size and np.isfinite(grid).any():
            vmax = max(vmax, float(np.nanmax(grid)))
    vmax = max(vmax, 2.0)
    image = None
    for k, lid in enumerate(ids):
        ax = axes[k // ncols][k % ncols]
        grid, its, recs = grids[lid]
        if grid.shape[1] == 0:
            ax.text(0.5, 0.5, "no steps", ha="center", va="center", transform=ax.transAxes)
            continue
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="magma", vmin=0.0, vmax=vmax,
                          interpolation="nearest", extent=(-0.5, grid.shape[1] - 0.5, -0.5, grid.shape[0] - 0.5))
        ticks = sorted(set([0, grid.shape[1] - 1] + list(range(0, grid.shape[1], max(1, grid.shape[1] // 5)))))
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(its[t]) for t in ticks], fontsize=8)
        step = max(1, num_experts // 8)
        ax.set_yticks(list(range(0, num_experts, step)))
        ax.tick_params(axis="y", labelsize=8)
        last_cv = recs[-1].get("load_cv")
        cv = f", last CV {last_cv:.2f}" if finite(last_cv) else ""
        ax.set_title(f"layer {lid}{cv}", fontsize=10)
        ax.set_xlabel("iteration", fontsize=9)
        if k % ncols == 0:
            ax.set_ylabel("expert", fontsize=9)
    for k in range(len(ids), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.suptitle(title, fontsize=11)
    if image is not None:
        cbar = fig.colorbar(image, ax=[a for row in axes for a in row], shrink=0.9, pad=0.02)
        cbar.set_label("tokens / mean of the layer's experts (1 = balanced)", fontsize=9)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot(metrics_path, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy  # noqa: F401  (the heatmap needs it; matplotlib depends on it)
    except ImportError as e:
        print(f"plot_metrics: matplotlib is not available ({e}); install python3-matplotlib", file=sys.stderr)
        return SKIP
    records = load_records(metrics_path)
    train, valid, layers = split_records(records)
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(metrics_path)
    loss_png = os.path.join(out_dir, "loss.png")
    load_png = os.path.join(out_dir, "expert_load.png")
    plot_loss(plt, train, valid, loss_png, f"loss ({name})")
    plot_expert_load(plt, layers, load_png, f"expert load per MoE layer ({name})")
    print(f"plot_metrics: {len(train)} train, {len(valid)} validation, {len(layers)} MoE layer(s) -> "
          f"{loss_png}, {load_png}")
    return 0


def write_smoke_metrics(path, layers=(1, 2, 3), experts=8, steps=24, log_interval=5):
    """A tiny run: the loss falls, the router starts unbalanced and balances out; a few lines the
    script must skip (another record type, a blank line)."""
    import random

    rng = random.Random(1234)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"type": "run", "world_size": 1, "config": {"num_layers": 4}}) + "\n")
        for s in range(1, steps + 1):
            it = s * log_interval
            lm = 5.5 * math.exp(-it / 40.0) + 1.2 + 0.05 * rng.random()
            aux = 1.0 + 0.6 * math.exp(-it / 25.0)
            z = 0.4 * math.exp(-it / 60.0) + 0.05
            f.write(json.dumps({"type": "train", "iteration": it, "consumed_samples": it * 16, "lr": 1e-3,
                                "lm_loss": lm, "losses": {"lm loss": lm, "load_balancing_loss": aux, "z_loss": z},
                                "grad_norm": 0.5, "elapsed_ms_per_iteration": 10.0, "tokens_per_second": 5000.0,
                                "peak_bytes": 1 << 20}) + "\n")
            for layer in layers:
                skew = math.exp(-it / 30.0)
                weights = [1.0 + 3.0 * skew * (1.0 if e == layer % experts else 0.0) + 0.3 * rng.random()
                           for e in range(experts)]
                total = 2048
                load = [int(total * w / sum(weights)) for w in weights]
                mean = sum(load) / len(load)
                cv = math.sqrt(sum((x - mean) ** 2 for x in load) / len(load)) / mean
                f.write(json.dumps({"type": "moe_layer", "iteration": it, "layer": layer, "tokens_per_expert": load,
                                    "load_min": min(load), "load_max": max(load), "load_cv": cv,
                                    "aux_loss": aux, "z_loss": z, "dropped_tokens": 0}) + "\n")
            if s % 4 == 0:
                v = lm + 0.1
                f.write(json.dumps({"type": "validation", "iteration": it, "lm_loss": v, "ppl": math.exp(v),
                                    "losses": {"lm loss": v}}) + "\n")
        f.write("\n")


def check_png(path):
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        raise SystemExit(f"plot_metrics --smoke: {path} is not a PNG")
    width = int.from_bytes(head[16:20], "big")
    height = int.from_bytes(head[20:24], "big")
    if width < 300 or height < 200 or os.path.getsize(path) < 10000:
        raise SystemExit(f"plot_metrics --smoke: {path} looks empty ({width}x{height}, {os.path.getsize(path)} bytes)")
    return width, height


def smoke(out_dir):
    out = out_dir or tempfile.mkdtemp(prefix="plot_metrics_smoke_")
    os.makedirs(out, exist_ok=True)
    metrics = os.path.join(out, "smoke_metrics.jsonl")
    write_smoke_metrics(metrics)
    rc = plot(metrics, out)
    if rc != 0:
        return rc
    # The parser itself: record counts, and a torn last line is dropped, not fatal.
    train, valid, layers = split_records(load_records(metrics))
    if (len(train), len(valid), sorted(layers)) != (24, 6, [1, 2, 3]):
        raise SystemExit(f"plot_metrics --smoke: read {len(train)} train, {len(valid)} validation records and "
                         f"layers {sorted(layers)}; expected 24, 6, [1, 2, 3]")
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"type": "train", "iterat')
    if len(split_records(load_records(metrics))[0]) != 24:
        raise SystemExit("plot_metrics --smoke: a torn last line changed the records")
    for png in ("loss.png", "expert_load.png"):
        w, h = check_png(os.path.join(out, png))
        print(f"plot_metrics --smoke: {png} {w}x{h} ok")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", nargs="?", help="the metrics file (JSON lines)")
    p.add_argument("--out-dir", "--out", dest="out",
                   help="directory for loss.png and expert_load.png (default: beside the metrics file)")
    p.add_argument("--smoke", action="store_true", help="plot a generated tiny metrics file and check the PNGs")
    a = p.parse_args()
    if a.smoke:
        return smoke(a.out)
    if not a.metrics:
        p.error("give a metrics file, or --smoke")
    if not os.path.exists(a.metrics):
        p.error(f"no such file: {a.metrics}")
    return plot(a.metrics, a.out or os.path.dirname(os.path.abspath(a.metrics)))


if __name__ == "__main__":
    sys.exit(main())
