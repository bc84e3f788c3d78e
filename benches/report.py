"""The suite's report: ``results.json`` (environment header, options, every round of every
system), ``results.md`` (the table pasted into the README between its BENCH-TABLE markers)
and ``results.png`` (messages/s per scenario for fastconn, baseline and ceiling).

``python benches/report.py [bench-results/results.json]`` renders the markdown and the chart
again from a saved JSON (after a change to the report, or to compare an older run)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from scenarios._base import Options, Sample, ScenarioResult, SystemResult, Target

TIMES = "\u00d7"


def settings(opts: Options) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(opts).items() if k != "workdir"}


def write(
    out: Path, env: dict[str, Any], opts: Options, results: list[ScenarioResult], elapsed: float
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "environment": env,
        "options": settings(opts),
        "elapsed_s": round(elapsed, 1),
        "scenarios": [r.to_json() for r in results],
    }
    (out / "results.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return [out / "results.json", *render(out, env, settings(opts), results)]


def render(out: Path, env: dict[str, Any], opts: dict[str, Any], results: list[ScenarioResult]) -> list[Path]:
    (out / "results.md").write_text(markdown(results, env, opts) + "\n")
    paths = [out / "results.md"]
    if chart(results, out / "results.png", env):
        paths.append(out / "results.png")
    return paths


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any], list[ScenarioResult]]:
    """A saved ``results.json`` back as (environment, options, results)."""
    data = json.loads(path.read_text())
    results = []
    for item in data["scenarios"]:
        result = ScenarioResult(item["name"], item["title"], item["params"], notes=item["notes"])
        result.error, result.seconds = item["error"], item["seconds"]
        result.targets = [
            Target(t["text"], t["kind"], t["value"], t.get("figure", "")) for t in item["targets"]
        ]
        for role, system in item["systems"].items():
            result.systems[role] = SystemResult(system["label"], [Sample(**s) for s in system["rounds"]])
        results.append(result)
    return data["environment"], data["options"], results


# -- markdown ---------------------------------------------------------------------------------


def _rate(result: ScenarioResult, role: str) -> str:
    system = result.systems.get(role)
    if system is None or not system.samples:
        return "—"
    figure = system.figure("rate")
    return f"{figure.median:,.0f} ±{figure.spread:.0%}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}{TIMES}"


def _pair(result: ScenarioResult, names: tuple[str, ...], fmt: str) -> str:
    """fastconn's figures, the baseline's in parentheses."""

    def one(role: str) -> str | None:
        system = result.systems.get(role)
        if system is None:
            return None
        values = [system.median(n) for n in names]
        if any(v is None for v in values):
            return None
        return " / ".join(fmt.format(v) for v in values)

    mine, theirs = one("fastconn"), one("baseline")
    if mine is None:
        return "—"
    return f"{mine} ({theirs})" if theirs else mine


def _targets(result: ScenarioResult) -> str:
    marks = []
    for target in result.targets:
        met = result.target_met(target)
        marks.append(f"{'✓' if met else '✗' if met is not None else '?'} {target.text}")
    return "; ".join(marks)


def _row_title(result: ScenarioResult) -> str:
    p = result.params
    detail = []
    if "messages" in p:
        detail.append(f"{p['messages']:,} {TIMES} {p['payload']} B")
    if "inflight" in p:
        detail.append(f"{p['inflight']} in flight")
    return f"**{result.name}**: {result.title}" + (f" ({', '.join(detail)})" if detail else "")


def main_table(results: list[ScenarioResult]) -> list[str]:
    lines = [
        f"| Scenario | fastconn msg/s | baseline msg/s | {TIMES} baseline | ceiling msg/s | {TIMES} ceiling "
        "| p50 / p99 ms | CPU s / 100k msgs | peak RSS MB | targets |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if r.name == "bridge" or r.error or not r.systems:
            continue
        lines.append(
            f"| {_row_title(r)} | {_rate(r, 'fastconn')} | {_rate(r, 'baseline')} "
            f"| {_ratio(r.ratio('baseline'))} | {_rate(r, 'ceiling')} | {_ratio(r.ratio('ceiling'))} "
            f"| {_pair(r, ('p50_ms', 'p99_ms'), '{:.1f}')} | {_pair(r, ('cpu_per_100k',), '{:.2f}')} "
            f"| {_pair(r, ('rss_mb',), '{:.0f}')} | {_targets(r)} |"
        )
    return lines


BUSY = ("loop", "native", "broker", "sink")


def busy_table(results: list[ScenarioResult]) -> list[str]:
    """Cores kept busy during the throughput window: which side is the limit."""
    lines = [
        "| Where the time goes (cores busy in the window) | system | event loop | native threads "
        "| broker | sink |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error or r.name == "bridge":
            continue
        for role in ("fastconn", "baseline"):
            system = r.systems.get(role)
            if system is None:
                continue
            values = [system.median(f"{name}_busy") for name in BUSY]
            if all(v is None for v in values):
                continue
            cells = " | ".join("—" if v is None else f"{v:.2f}" for v in values)
            lines.append(f"| {r.name}: {r.title} | {role} | {cells} |")
    return lines if len(lines) > 2 else []


def bridge_table(result: ScenarioResult) -> list[str]:
    lines = [
        "| Bridge: batch size | loop | µs per batch | µs per message | submit µs | drain µs "
        "| loop lag p99 ms | loop lag max ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    sizes = sorted(
        {
            int(k.removeprefix("us_"))
            for system in result.systems.values()
            for s in system.samples
            for k in s.extra
            if k.startswith("us_")
        }
    )
    for size in sizes:
        for loop, system in result.systems.items():
            per_batch = system.median(f"us_{size}")
            if per_batch is None:
                continue

            def figure(name: str, system: SystemResult = system, size: int = size) -> float:
                return system.median(f"{name}_{size}") or 0.0

            lines.append(
                f"| {size} | {loop} | {per_batch:,.1f} | {per_batch / size:,.2f} | {figure('submit'):,.1f} "
                f"| {figure('drain'):,.1f} | {figure('lag99'):.2f} | {figure('lagmax'):.2f} |"
            )
    return lines


def markdown(results: list[ScenarioResult], env: dict[str, Any], opts: dict[str, Any]) -> str:
    lines = [
        f"fastconn {env['fastconn']} ({env['git']}), {env['date']}: {env['cpu']}, {env['cores']} cores, "
        f"load {env['load_average']} at start; {opts['rounds']} rounds per system, alternating; "
        f"median ± half the range. Latency: publish → function at {opts['probe_rate']:,.0f} msg/s "
        "(ceiling: wrk's round trip at saturation). CPU and RSS: the fastconn process "
        "(baseline in parentheses).",
        "",
        *main_table(results),
    ]
    busy = busy_table(results)
    if busy:
        lines += ["", *busy]
    bridge = next((r for r in results if r.name == "bridge" and not r.error), None)
    if bridge is not None:
        lines += ["", *bridge_table(bridge)]
    legend = [
        f"- {r.name}: baseline = {r.systems['baseline'].label}"
        for r in results
        if "baseline" in r.systems and not r.error
    ]
    notes = [f"- {r.name}: {note}" for r in results for note in r.notes]
    errors = [f"- **{r.name} failed**: {r.error}" for r in results if r.error]
    for block in (legend, notes, errors):
        if block:
            lines += ["", *block]
    return "\n".join(lines)


# -- chart ------------------------------------------------------------------------------------


def chart(results: list[ScenarioResult], path: Path, env: dict[str, Any]) -> bool:
    """Horizontal bars, log scale (rates span three orders of magnitude), whiskers = range."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    rows = [r for r in results if r.systems and not r.error and r.name != "bridge"]
    if not rows:
        return False
    roles = [("fastconn", "#1f77b4"), ("baseline", "#ff7f0e"), ("ceiling", "#7f7f7f")]
    height = 0.26
    fig, ax = plt.subplots(figsize=(10, 0.75 * len(rows) + 1.8))
    for offset, (role, color) in enumerate(roles):
        ys: list[float] = []
        widths: list[float] = []
        errs: list[list[float]] = [[], []]
        for i, r in enumerate(rows):
            system = r.systems.get(role)
            if system is None or not system.samples:
                continue
            values = system.figure("rate").values
            median = system.figure("rate").median
            ys.append(i + (offset - 1) * height)
            widths.append(median)
            errs[0].append(median - min(values))
            errs[1].append(max(values) - median)
        if ys:
            ax.barh(ys, widths, height, xerr=errs, color=color, label=role, capsize=2)
            for y, w, above in zip(ys, widths, errs[1], strict=True):
                ax.text((w + above) * 1.06, y, f"{w:,.0f}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_chart_label(r) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("messages / s (median of rounds; whiskers: min-max)")
    ax.set_title(
        f"fastconn {env['fastconn']} ({env['git']}), {env['cores']} cores, {env['date']}", fontsize=9, pad=30
    )
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _chart_label(r: ScenarioResult) -> str:
    if r.name == "async-callback":
        return "async-callback\n(baseline: fastconn sync)"
    if r.name == "scaling":
        return f"scaling {r.params.get('payload')} B, {r.params.get('inflight')} in flight"
    return r.name


README_START = "<!-- BENCH-TABLE -->"
README_END = "<!-- /BENCH-TABLE -->"


def update_readme(readme: Path, table: str) -> None:
    """Replaces what stands between the README's BENCH-TABLE markers with ``table``."""
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(f"{text[:start]}\n{table.strip()}\n{text[end:]}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Render a saved run's markdown and chart again.")
    parser.add_argument(
        "results",
        nargs="?",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "bench-results" / "results.json",
    )
    parser.add_argument(
        "--readme", type=Path, help="also write the table into this README's BENCH-TABLE block"
    )
    args = parser.parse_args()
    environment_, options_, results_ = load(args.results)
    for written in render(args.results.parent, environment_, options_, results_):
        print(f"wrote {written}")
    if args.readme is not None:
        update_readme(args.readme, markdown(results_, environment_, options_))
        print(f"updated {args.readme}")
