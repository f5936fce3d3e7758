"""Reports people read: the monitor's PNG and summary, the impact's PNG and summary.

**Monitoring report**: one PNG a person can read in ten seconds.

Top: PSI of every feature (rows) by monitor date (columns), coloured against the warn and
alert thresholds, so a shift shows as a band that starts on a day. Bottom: the input volume
against its trailing median and the published lists' coverage (catalogue coverage,
cold-start share, new-item share) over the same days.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

#: Trend lines of the lower panel: metric -> label.
TRENDS = {
    "volume_ratio": "volume / trailing median",
    "catalogue_coverage": "catalogue coverage",
    "cold_start_share": "cold-start share",
    "new_item_share": "new-item share",
}


def write_report(
    history: pd.DataFrame,
    path: Path,
    *,
    warn: float,
    alert: float,
    title: str,
    max_features: int = 40,
) -> Path:
    """Draw ``history`` (monitoring rows: run_date, metric, subject, value, status) to
    ``path`` (PNG, written atomically). The features shown are the ``max_features`` with the
    highest PSI on any day."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    history = history.assign(
        day=pd.to_datetime(history["run_date"], utc=True).dt.strftime("%Y-%m-%d")
    )
    psi = history[history["metric"] == "psi"].pivot_table(
        index="subject", columns="day", values="value", aggfunc="last"
    )
    if len(psi):
        psi = psi.loc[psi.max(axis=1).sort_values(ascending=False).index[:max_features]]
    trends = history[history["metric"].isin(list(TRENDS))].pivot_table(
        index="day", columns="metric", values="value", aggfunc="last"
    )

    rows = max(len(psi), 1)
    fig, (top, bottom) = plt.subplots(
        2,
        1,
        figsize=(max(8.0, 0.45 * psi.shape[1] + 5), 0.22 * rows + 5.5),
        gridspec_kw={"height_ratios": [max(rows * 0.22, 1.5), 2.5]},
    )
    if len(psi):
        cmap = ListedColormap(["#d9f0d3", "#fee08b", "#d73027"])
        norm = BoundaryNorm(
            [0.0, warn, alert, max(alert * 4, float(np.nanmax(psi.values)) + 1)], cmap.N
        )
        image = top.imshow(
            psi.to_numpy(dtype=float), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest"
        )
        top.set_yticks(range(len(psi)), psi.index, fontsize=7)
        top.set_xticks(range(psi.shape[1]), psi.columns, rotation=60, fontsize=7, ha="right")
        for (i, j), value in np.ndenumerate(psi.to_numpy(dtype=float)):
            if np.isfinite(value) and psi.shape[1] <= 31:
                top.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=5)
        fig.colorbar(image, ax=top, label=f"PSI (warn {warn}, alert {alert})", fraction=0.03)
    else:
        top.text(0.5, 0.5, "no PSI yet", ha="center", va="center")
        top.set_axis_off()
    top.set_title(title, fontsize=10)
    for metric, label in TRENDS.items():
        if metric in trends:
            bottom.plot(trends.index, trends[metric], marker="o", label=label)
    bottom.axhline(1.0, color="grey", linewidth=0.5, linestyle="--")
    bottom.set_ylim(bottom=0)
    bottom.tick_params(axis="x", rotation=60, labelsize=7)
    bottom.legend(fontsize=7, loc="upper left")
    bottom.set_title("input volume and list coverage", fontsize=9)
    save_figure(fig, path)
    logger.info("monitoring report: %s (%d features x %d days)", path, len(psi), psi.shape[1])
    return path


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` as PNG atomically (temp file, rename), close it."""
    from matplotlib import pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, format="png", dpi=110)
    plt.close(fig)
    partial.replace(path)
    return path


def format_summary(summary: dict) -> str:
    """A few lines for a terminal (``make run``) or a task log."""
    lines = [
        f"Monitor for {summary['as_of'][:10]}: {summary['current_events']:,} events in "
        f"the current window against {summary['reference']} "
        f"({summary['reference_events']:,} events)"
    ]
    top = ", ".join(f"{name} {value:.3f}" for name, value in summary["top_psi"])
    lines.append(f"  drift      largest PSI: {top or 'none'}")
    health = ", ".join(f"{k} {_fmt(v)}" for k, v in summary["health"].items())
    lines.append(f"  health     {health}")
    if summary["lists"]:
        lines.append(
            "  lists      " + ", ".join(f"{k} {_fmt(v)}" for k, v in summary["lists"].items())
        )
    status = ("ALERT: " + "; ".join(summary["alerts"])) if summary["alerts"] else "no alert"
    lines.append(
        f"  status     {status}"
        + (f" ({len(summary['warnings'])} warning(s))" if summary["warnings"] else "")
    )
    lines.append(f"  report     {summary['report']}")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def wilson_interval(
    x: np.ndarray, n: np.ndarray, z: float = 1.959964
) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson score interval of proportions ``x / n`` (NaN where ``n`` is 0)."""
    x, n = np.asarray(x, float), np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = x / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def write_impact_report(daily: pd.DataFrame, path: Path, *, title: str) -> Path:
    """Daily CTR (when impressions exist) and conversion per variant, 95% Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = [
        ("ctr", "clicks", "impressions", "CTR of recommended items"),
        (
            "conversion",
            "converted_users",
            "users_active",
            "conversion (cart or purchase of a recommended item) per active user",
        ),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 7), sharex=True)
    for ax, (name, x_col, n_col, label) in zip(axes, panels, strict=True):
        if daily.empty or not (daily[n_col] > 0).any() or not daily[x_col].notna().any():
            ax.text(0.5, 0.5, f"no {name} yet", ha="center", va="center")
        else:
            per = daily.groupby(["day", "variant"])[[x_col, n_col]].sum().reset_index()
            for variant, rows in per.groupby("variant"):
                low, high = wilson_interval(rows[x_col], rows[n_col])
                rate = rows[x_col] / rows[n_col].where(rows[n_col] > 0)
                ax.plot(rows["day"], rate, marker="o", label=str(variant))
                ax.fill_between(rows["day"], low, high, alpha=0.2)
            ax.legend(fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.set_ylim(bottom=0)
    axes[-1].tick_params(axis="x", rotation=45, labelsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def format_impact(summary: dict) -> str:
    """A per-variant summary for a terminal or a task log."""
    lines = [
        f"Impact of the lists served {summary['start'][:10]} .. before "
        f"{summary['as_of'][:10]} ({summary['served_sets']} list set(s), "
        f"{summary['events']:,} events)"
    ]
    lines.append(
        f"  {'variant':<14}{'served':>8}{'active':>8}{'engaged':>10}{'convert':>10}{'CTR':>9}"
    )
    for row in summary["variants"]:
        ctr = row.get("ctr")
        lines.append(
            f"  {row['variant']:<14}{row['users_served']:>8,}{row['users_active']:>8,}"
            f"{_pct(row['engaged_share']):>10}{_pct(row['conversion']):>10}"
            f"{_pct(ctr) if ctr is not None else 'n/a':>9}"
        )
    for row in summary["comparison"]:
        verdict = row.get("decision") or (
            "significant" if row["significant"] else "not significant"
        )
        lines.append(
            f"  {row['metric']}: {row['variant']} vs {row['control']}: "
            f"{_num(row['diff'], '+.4f')} (95% CI {_num(row['diff_low'], '+.4f')} .. "
            f"{_num(row['diff_high'], '+.4f')}), "
            f"p = {_num(row['p_value_adjusted'], '.4g')}, "
            f"{verdict}; MDE at this sample {_num(row['mde'], '.4f')}"
        )
    if summary.get("srm"):
        srm = summary["srm"]
        lines.append(
            f"  sample ratio: {'MISMATCH' if srm['mismatch'] else 'ok'} "
            f"(p = {_num(srm['p_value'], '.3g')}) {srm['message']}"
        )
    if summary.get("sitewide"):
        lines.append(
            f"  site-wide, every user active before the window {'users':>8}"
            f"{'active':>8}{'convert':>10}{'rev/user':>10}"
        )
        for row in summary["sitewide"]:
            lines.append(
                f"  {row['variant']:<48}{row['users']:>8,}{row['active_any']:>8,}"
                f"{_pct(row['conversion_any']):>10}"
                f"{_num(row['revenue_per_user_any'], '.2f'):>10}"
            )
    for row in summary.get("holdout_comparison") or []:
        lines.append(
            f"  {row['metric']}: {row['variant']} vs holdout {row['control']}: "
            f"{_num(row['diff'], '+.4f')} (95% CI {_num(row['diff_low'], '+.4f')} .. "
            f"{_num(row['diff_high'], '+.4f')}), "
            f"p = {_num(row['p_value_adjusted'], '.4g')}, "
            f"{'significant' if row['significant'] else 'not significant'}"
        )
    for gate in summary.get("online_gate") or []:
        lines.append(
            f"  online gate, v{gate['version']} ({gate['variant']}): "
            f"{gate['decision'] or 'no decision yet'}: {gate['reason']}"
        )
    lines.append(f"  report {summary['report']}")
    return "\n".join(lines)


def _num(value, spec: str) -> str:
    """``value`` formatted with ``spec``; "n/a" for a statistic that is undefined (None or
    NaN: no conversion in the control, say, leaves the lift and the MDE undefined)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _pct(value) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.1f}%"
    )
