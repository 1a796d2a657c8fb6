#!/usr/bin/env python3
"""Merges gpu_bench's and torch_peer.py's JSON-lines results into the one table run.sh prints last.

    python3 benchmarks/gpu/merge_table.py --merge-only OURS.jsonl PEER.jsonl [--out table.md]
    python3 benchmarks/gpu/merge_table.py --selftest     # the merge logic on generated sample files

Rows are joined on the record's "name" (copy, dense, permute, unpermute, grouped.<mode>.<layer>.<fc>,
layer.<shape>). Columns:
  case            ours' label (the shape it ran)
  ours ms         libmoecore, median ms per call
  peer ms         PyTorch done the way Megatron Core does it: copy_ / torch.mm for the references,
                  index_select / index_add_ for permute / unpermute, a loop of one torch.mm per expert
                  for the grouped GEMMs, SequentialMLP for the layer
  _grouped_mm ms  PyTorch with torch._grouped_mm (grouped GEMMs and the layer; n/a where torch has
                  none or it failed, - where it does not apply)
  ours rate       achieved GB/s (bytes read + written) or TFLOP/s (GEMM FLOPs)
  fraction        permute / unpermute: of the device's copy bandwidth measured by gpu_bench in the
                  same run; grouped GEMM: of one dense bf16 GEMM of equal FLOPs (same operands, the
                  expert dimension folded in) timed in the same run; layer: of the best dense rate
  target, met?    permute / unpermute >= 80 % of copy; grouped GEMM >= 75 % of dense; layer faster
                  than every available peer (met? then shows the best peer's time over ours)
Benchmarks, not tests: the exit status is 0 whatever the targets say (2 for unreadable input).
"""
import argparse
import json
import math
import os
import sys
import tempfile

KIND_ORDER = ["copy", "dense_gemm", "permute", "unpermute", "grouped_gemm", "layer"]
TARGETS = {"permute": ("copy", 0.80), "unpermute": ("copy", 0.80), "grouped_gemm": ("dense", 0.75)}


def load(path, source):
    """Records of one JSON-lines file; a missing file gives none (the table then shows '-')."""
    if path is None or not os.path.exists(path):
        print("merge_table: %s results %s not found; their columns stay empty" % (source, path), file=sys.stderr)
        return []
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise SystemExit("merge_table: %s:%d is not JSON: %s" % (path, n, exc))
            if "kind" not in rec or "name" not in rec:
                raise SystemExit("merge_table: %s:%d has no 'kind' or 'name'" % (path, n))
            out.append(rec)
    return out


def fmt_num(x):
    """Four significant digits at least, never exponent notation (0.007341, 0.4000, 20.00, 785.0)."""
    if x == 0 or not math.isfinite(x):
        return "%g" % x
    decimals = max(1, 3 - int(math.floor(math.log10(abs(x)))))
    return "%.*f" % (decimals, x)


def fmt_ms(rec):
    if rec is None:
        return "-"
    if rec.get("ms") is None:
        return "n/a"
    return fmt_num(rec["ms"])


def merge(ours, peer):
    """The table rows: one dict per case with the cells and the target verdict (True/False/None)."""
    by_name = {}
    order = []
    for rec in ours:
        if rec["kind"] == "device":
            continue
        if rec["name"] not in by_name:
            order.append(rec["name"])
        by_name[rec["name"]] = rec
    peer_seq, peer_gmm, peer_kind = {}, {}, {}
    for rec in peer:
        if rec["kind"] == "device":
            continue
        if rec.get("variant") == "grouped_mm":
            peer_gmm[rec["name"]] = rec
        else:
            peer_seq[rec["name"]] = rec
        peer_kind[rec["name"]] = rec["kind"]
        if rec["name"] not in by_name and rec["name"] not in order:
            order.append(rec["name"])

    copy_gbps = by_name.get("copy", {}).get("gbps")
    dense_rates = [r.get("tflops") for r in ours if r["kind"] == "dense_gemm"]
    dense_rates += [r.get("dense_tflops") for r in ours if r["kind"] == "grouped_gemm"]
    dense_rates = [x for x in dense_rates if x]
    best_dense = max(dense_rates) if dense_rates else None

    def kind_of(name):
        return by_name[name]["kind"] if name in by_name else peer_kind.get(name, "")

    order.sort(key=lambda n: KIND_ORDER.index(kind_of(n)) if kind_of(n) in KIND_ORDER else len(KIND_ORDER))
    rows = []
    for name in order:
        o, ps, pg = by_name.get(name), peer_seq.get(name), peer_gmm.get(name)
        kind = kind_of(name)
        row = dict(name=name, kind=kind, label=(o or ps or pg or {}).get("label", name), ours=fmt_ms(o),
                   peer=fmt_ms(ps), gmm=fmt_ms(pg) if kind in ("grouped_gemm", "layer") else "-",
                   rate="-", fraction="-", target="ref" if kind in ("copy", "dense_gemm") else "-", met="-",
                   verdict=None)
        if o is not None and o.get("ms") is not None:
            if o.get("gbps") is not None:
                row["rate"] = fmt_num(o["gbps"]) + " GB/s"
            elif o.get("tflops") is not None:
                row["rate"] = fmt_num(o["tflops"]) + " TFLOP/s"
        frac = None
        if o is not None and o.get("ms") is not None:
            if kind in ("permute", "unpermute"):
                frac = o["gbps"] / copy_gbps if copy_gbps else o.get("fraction")
                of = "copy"
            elif kind == "grouped_gemm":
                frac = o["tflops"] / o["dense_tflops"] if o.get("dense_tflops") else o.get("fraction")
                of = "dense"
            elif kind == "layer":
                frac = o["tflops"] / best_dense if best_dense else o.get("fraction")
                of = "dense"
            if frac is not None:
                row["fraction"] = "%.0f %% %s" % (100.0 * frac, of)
        if kind in TARGETS:
            of, need = TARGETS[kind]
            row["target"] = ">= %.0f %% %s" % (100 * need, of)
            if frac is None:
                row["met"] = "?"
            else:
                row["verdict"] = frac >= need
                row["met"] = "yes" if row["verdict"] else "NO"
        elif kind == "layer":
            row["target"] = "< peers"
            peers = [r["ms"] for r in (ps, pg) if r is not None and r.get("ms") is not None]
            if o is None or o.get("ms") is None or not peers:
                row["met"] = "?"
            else:
                row["verdict"] = o["ms"] < min(peers)
                row["met"] = "%s (x%.2f)" % ("yes" if row["verdict"] else "NO", min(peers) / o["ms"])
        rows.append(row)
    return rows


COLUMNS = [("case", "label"), ("ours ms", "ours"), ("peer ms (Megatron way)", "peer"), ("_grouped_mm ms", "gmm"),
           ("ours rate", "rate"), ("fraction", "fraction"), ("target", "target"), ("met?", "met")]


def render(rows, ours, peer):
    def device(recs):
        for r in recs:
            if r["kind"] == "device":
                return r
        return {}

    od, pd = device(ours), device(peer)
    lines = []
    lines.append("libmoecore GPU benchmarks: ours on %s, peer on %s (torch %s)" % (
        od.get("label", "?"), pd.get("label", "?"), pd.get("torch", "?")))
    if od.get("quick") or pd.get("quick"):
        lines.append("NOTE: --quick run (tiny shapes, one iteration): the numbers mean nothing")
    if od and pd and od.get("label") != pd.get("label"):
        lines.append("WARNING: ours and the peer ran on different devices")
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for h, k in COLUMNS]
    lines.append("| " + " | ".join(h.ljust(w) for (h, _), w in zip(COLUMNS, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        cells = []
        for (h, k), w in zip(COLUMNS, widths):
            cells.append(r[k].ljust(w) if k == "label" else r[k].rjust(w))
        lines.append("| " + " | ".join(cells) + " |")
    judged = [r for r in rows if r["verdict"] is not None]
    groups = [("permute/unpermute", ("permute", "unpermute")), ("grouped GEMM", ("grouped_gemm",)),
              ("layer", ("layer",))]
    parts = []
    for title, kinds in groups:
        g = [r for r in judged if r["kind"] in kinds]
        if g:
            parts.append("%s %d/%d" % (title, sum(r["verdict"] for r in g), len(g)))
    lines.append("targets met: %d of %d%s" % (sum(r["verdict"] for r in judged), len(judged),
                                              (" (" + ", ".join(parts) + ")") if parts else ""))
    return "\n".join(lines)


def merge_files(ours_path, peer_path, out_path=None):
    ours, peer = load(ours_path, "ours"), load(peer_path, "peer")
    rows = merge(ours, peer)
    text = render(rows, ours, peer)
    print(text)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text + "\n")
    return rows


# ---- --selftest: sample files with known verdicts -------------------------------------------------------
def sample_records():
    dev = "NVIDIA H100 80GB HBM3"
    o = lambda **k: dict(source="ours", variant="moecore", device=dev, **k)  # noqa: E731
    t = lambda **k: dict(source="torch", device=dev, **k)  # noqa: E731
    ours = [
        o(kind="device", name="device", label=dev, quick=False),
        o(kind="copy", name="copy", label="copy 512 MiB", ms=0.4, bytes=1.2e9, gbps=3000.0),
        o(kind="permute", name="permute", label="permute T4096", ms=0.05, bytes=1.275e8, gbps=2550.0),  # 85 %
        o(kind="unpermute", name="unpermute", label="unpermute T4096", ms=0.05, bytes=1.05e8, gbps=2100.0),  # 70 %
        o(kind="dense_gemm", name="dense", label="dense 8192^3", ms=1.4, flops=1.1e12, tflops=785.0),
        o(kind="grouped_gemm", name="grouped.fwd.mixtral.fc1", label="grouped fwd mixtral fc1", ms=3.0,
          flops=1.9e12, tflops=640.0, dense_tflops=700.0),  # 91 %
        o(kind="grouped_gemm", name="grouped.wgrad.deepseek.fc2", label="grouped wgrad deepseek fc2", ms=3.0,
          flops=0.9e12, tflops=400.0, dense_tflops=700.0),  # 57 %
        o(kind="layer", name="layer.mixtral", label="layer mixtral", ms=20.0, flops=8.7e12, tflops=435.0),
        o(kind="layer", name="layer.deepseek", label="layer deepseek", ms=40.0, flops=9.7e12, tflops=242.0),
    ]
    peer = [
        t(kind="device", name="device", variant="torch", label=dev, torch="2.11.0"),
        t(kind="copy", name="copy", variant="torch", label="copy", ms=0.41, gbps=2900.0),
        t(kind="permute", name="permute", variant="torch", label="permute", ms=0.09, gbps=1400.0),
        t(kind="unpermute", name="unpermute", variant="torch", label="unpermute", ms=0.12, gbps=900.0),
        t(kind="dense_gemm", name="dense", variant="torch", label="dense", ms=1.39, tflops=790.0),
        t(kind="grouped_gemm", name="grouped.fwd.mixtral.fc1", variant="sequential", label="g", ms=3.2, tflops=600.0),
        t(kind="grouped_gemm", name="grouped.fwd.mixtral.fc1", variant="grouped_mm", label="g", ms=2.9,
          tflops=660.0),
        t(kind="grouped_gemm", name="grouped.wgrad.deepseek.fc2", variant="sequential", label="g", ms=3.5,
          tflops=350.0),
        t(kind="grouped_gemm", name="grouped.wgrad.deepseek.fc2", variant="grouped_mm", label="g", ms=None,
          error="RuntimeError: unsupported"),
        t(kind="layer", name="layer.mixtral", variant="sequential", label="l", ms=30.0, tflops=290.0),
        t(kind="layer", name="layer.mixtral", variant="grouped_mm", label="l", ms=25.0, tflops=348.0),  # ours wins
        t(kind="layer", name="layer.deepseek", variant="sequential", label="l", ms=60.0, tflops=160.0),
        t(kind="layer", name="layer.deepseek", variant="grouped_mm", label="l", ms=35.0, tflops=277.0),  # peer wins
        t(kind="layer", name="layer.peer_only", variant="sequential", label="peer-only row", ms=1.0),
    ]
    expect = {"copy": None, "dense": None, "permute": True, "unpermute": False, "grouped.fwd.mixtral.fc1": True,
              "grouped.wgrad.deepseek.fc2": False, "layer.mixtral": True, "layer.deepseek": False,
              "layer.peer_only": None}
    return ours, peer, expect


def selftest():
    ours, peer, expect = sample_records()
    failures = []
    with tempfile.TemporaryDirectory() as d:
        a, b, out = os.path.join(d, "ours.jsonl"), os.path.join(d, "peer.jsonl"), os.path.join(d, "table.md")
        for path, recs in ((a, ours), (b, peer)):
            with open(path, "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in recs))
        rows = merge_files(a, b, out)
        with open(out) as f:
            written = f.read()
        by = {r["name"]: r for r in rows}
        for name, want in expect.items():
            if name not in by:
                failures.append("row %s missing" % name)
            elif by[name]["verdict"] is not want:
                failures.append("row %s: verdict %r, expected %r" % (name, by[name]["verdict"], want))
        checks = [
            ([r["name"] for r in rows][:3] == ["copy", "dense", "permute"], "rows ordered copy, dense, permute"),
            (by["permute"]["fraction"] == "85 % copy", "permute fraction 85 %% copy, got %s" % by["permute"]["fraction"]),
            (by["grouped.wgrad.deepseek.fc2"]["gmm"] == "n/a", "a failed _grouped_mm shows n/a"),
            (by["permute"]["gmm"] == "-", "_grouped_mm does not apply to permute"),
            (by["layer.mixtral"]["met"] == "yes (x1.25)", "layer met shows best peer / ours, got %s"
             % by["layer.mixtral"]["met"]),
            (by["layer.peer_only"]["ours"] == "-", "a peer-only row has no ours"),
            ("targets met: 3 of 6" in written, "summary counts 3 of 6"),
            (written.strip().splitlines()[-1].startswith("targets met"), "the summary is the last line"),
        ]
        failures += [msg for ok, msg in checks if not ok]
        # a missing peer file still gives a table with empty peer columns
        rows = merge_files(a, os.path.join(d, "missing.jsonl"))
        if any(r["peer"] != "-" for r in rows):
            failures.append("missing peer file: peer cells should be '-'")
    for f in failures:
        print("selftest FAILED: " + f)
    print("merge_table selftest: %s" % ("ok" if not failures else "%d failure(s)" % len(failures)))
    return 1 if failures else 0


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--merge-only", nargs=2, metavar=("OURS", "PEER"), help="the two JSON-lines files")
    p.add_argument("--out", help="also write the table here")
    p.add_argument("--selftest", action="store_true", help="check the merge on generated sample files")
    a = p.parse_args(argv)
    if a.selftest:
        return selftest()
    if not a.merge_only:
        p.error("give --merge-only OURS PEER or --selftest")
    if not os.path.exists(a.merge_only[0]):
        print("merge_table: ours results %s not found" % a.merge_only[0], file=sys.stderr)
        return 2
    merge_files(a.merge_only[0], a.merge_only[1], a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
