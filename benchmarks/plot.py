"""A curve of a result file as a PNG beside it (BENCHMARKS.md: where a curve says more than a table).

    python benchmarks/plot.py RESULT.json --x frames [--metric ttft] [--where op=varlen_attention]

Draws the engine's and the baseline's values of the rows whose ``metric`` (and ``--where``
config values) match, against ``config[x]`` on a log2 axis, with the ratio at each point; writes
``RESULT.png`` (or ``--out``). Pillow only (no plotting library in the engine's dependencies).
``benchmarks/long_video.py`` calls :func:`plot_result` after writing its JSON.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

W, H, LEFT, RIGHT, TOP, BOTTOM = 900, 560, 90, 30, 60, 80
ENGINE, BASELINE, GRID, INK = (200, 60, 40), (40, 90, 200), (225, 225, 225), (30, 30, 30)


def curve_rows(result: dict, x: str, metric: str | None = None, where: dict | None = None) -> list[dict]:
    """The rows to plot, sorted by ``config[x]`` (ValueError naming what is missing)."""
    rows = [r for r in result["rows"] if (metric is None or r["metric"] == metric)
            and all(str(r["config"].get(k)) == v for k, v in (where or {}).items())]
    if not rows:
        raise ValueError(f"no rows with metric={metric!r} and {where or {}} in {result.get('benchmark')!r}")
    if len({r["metric"] for r in rows}) > 1:
        raise ValueError(f"rows of several metrics {sorted({r['metric'] for r in rows})}: pass --metric")
    missing = [r["metric"] for r in rows if not isinstance(r["config"].get(x), (int, float))]
    if missing:
        raise ValueError(f"config[{x!r}] is not a number in {len(missing)} row(s)")
    return sorted(rows, key=lambda r: r["config"][x])


def plot_result(path: Path, x: str, metric: str | None = None, where: dict | None = None,
                out: Path | None = None) -> Path:
    from PIL import Image, ImageDraw

    result = json.loads(Path(path).read_text())
    rows = curve_rows(result, x, metric, where)
    xs = [float(r["config"][x]) for r in rows]
    ys = [v for r in rows for v in (r["engine"], r["baseline_value"])]
    log_x = min(xs) > 0 and max(xs) / min(xs) >= 8
    fx = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    x0, x1 = fx(min(xs)), fx(max(xs)) if len(xs) > 1 else fx(min(xs)) + 1
    y1 = max(ys) * 1.1 or 1.0

    def px(v: float) -> float:
        return LEFT + (fx(v) - x0) / ((x1 - x0) or 1) * (W - LEFT - RIGHT)

    def py(v: float) -> float:
        return H - BOTTOM - v / y1 * (H - TOP - BOTTOM)

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    for i in range(6):  # y grid and labels
        v = y1 * i / 5
        d.line([(LEFT, py(v)), (W - RIGHT, py(v))], fill=GRID)
        d.text((8, py(v) - 6), f"{v:.3g}", fill=INK)
    for v in xs:
        d.line([(px(v), TOP), (px(v), H - BOTTOM)], fill=GRID)
        d.text((px(v) - 12, H - BOTTOM + 8), f"{v:g}", fill=INK)
    d.rectangle([(LEFT, TOP), (W - RIGHT, H - BOTTOM)], outline=INK)
    unit, first = rows[0]["unit"], rows[0]
    for key, color in (("engine", ENGINE), ("baseline_value", BASELINE)):
        pts = [(px(xv), py(r[key])) for xv, r in zip(xs, rows)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=3)
        for p in pts:
            d.ellipse([(p[0] - 4, p[1] - 4), (p[0] + 4, p[1] + 4)], fill=color)
    for xv, r in zip(xs, rows):  # the ratio above the higher point
        d.text((px(xv) - 14, py(max(r["engine"], r["baseline_value"])) - 18), f"{r['ratio']:.2f}x", fill=INK)
    d.text((LEFT, 12), f"{result['benchmark']} on {result['device']} ({result['commit']}): {first['metric']} [{unit}]",
           fill=INK)
    d.text((LEFT, 32), f"engine (red) vs {first['baseline']} (blue); ratio = engine better by", fill=INK)
    d.text((W // 2 - 40, H - 30), x + (" (log2 axis)" if log_x else ""), fill=INK)
    out = Path(out) if out else Path(path).with_suffix(".png")
    img.save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", type=Path)
    ap.add_argument("--x", required=True, help="the config key on the x axis (e.g. frames, seqlen)")
    ap.add_argument("--metric", help="the rows' metric (needed where the file has several)")
    ap.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="only rows whose config has this value (repeatable)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    where = {}
    for w in args.where:
        k, sep, v = w.partition("=")
        if not sep:
            ap.error(f"--where needs KEY=VALUE, got {w!r}")
        where[k] = v
    try:
        print(f"wrote {plot_result(args.result, args.x, args.metric, where, args.out)}")
    except ValueError as e:
        ap.error(str(e))


if __name__ == "__main__":
    main()
