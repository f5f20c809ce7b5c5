"""Draw the Grafana dashboard's panels from a Prometheus, without Grafana (for docs and checks).

    .venv/bin/python ops/grafana/render.py --prometheus http://127.0.0.1:9090 \
        --minutes 10 --out ops/grafana/dashboard.png

Reads ops/grafana/async_pmd.json, runs every panel's PromQL through `/api/v1/query_range` over
the last `--minutes` (or `--start`/`--end`, unix seconds), and draws the panels in a grid with
matplotlib (`pip install matplotlib`, the `plot` extra). Legends follow the panels' legendFormat.
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARD = Path(__file__).with_name("async_pmd.json")
_COLUMNS = 3


def panels(dashboard: dict) -> list[dict]:
    """The dashboard's graph panels (rows skipped), in layout order."""
    return [p for p in dashboard["panels"] if p.get("type") != "row"]


def expressions(dashboard: dict) -> list[str]:
    """Every PromQL expression in the dashboard."""
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def query_range(prometheus: str, expr: str, start: float, end: float, step_s: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step_s})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.load(resp)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def render(prometheus: str, out: Path, start: float, end: float, dashboard: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = dashboard or json.loads(DASHBOARD.read_text())
    graphs = panels(dashboard)
    rows = (len(graphs) + _COLUMNS - 1) // _COLUMNS
    fig, axes = plt.subplots(rows, _COLUMNS, figsize=(5.2 * _COLUMNS, 2.6 * rows), squeeze=False)
    step_s = max(1.0, (end - start) / 300)
    for ax, panel in zip(axes.flat, graphs):
        for target in panel.get("targets", []):
            for series in query_range(prometheus, target["expr"], start, end, step_s):
                t, v = zip(*[(float(ts) - start, float(val)) for ts, val in series["values"]])
                ax.plot([x / 60 for x in t], v, linewidth=1,
                        label=legend(target.get("legendFormat", ""), series["metric"]))
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_title(panel["title"] + (f" [{unit}]" if unit in ("s", "percentunit") else ""), fontsize=8)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=5, loc="best")
    for ax in axes.flat[len(graphs):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("minutes", fontsize=7)
    fig.suptitle(dashboard.get("title", "dashboard"), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=60)
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency

    Image.open(out).convert("RGB").quantize(colors=64).save(out, optimize=True)  # ~3x smaller, for docs
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--out", type=Path, default=Path("ops/grafana/dashboard.png"))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--start", type=float)
    parser.add_argument("--end", type=float)
    args = parser.parse_args(argv)
    end = args.end or time.time()
    start = args.start or end - 60 * args.minutes
    print(render(args.prometheus.rstrip("/"), args.out, start, end))


if __name__ == "__main__":
    main()
