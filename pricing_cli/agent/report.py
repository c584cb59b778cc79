"""The human side of `pricectl evaluate`: the policy table, PNG plots and report.md.

Plots use matplotlib's Agg backend (no display needed). Each plot function returns the file
name it wrote, or None when there was nothing to draw, so report.md links only what exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pricing_cli.agent.baselines import SplitMeta

# Policies drawn in every price-path panel, in this order, when present.
PATH_POLICIES = ("historical", "agent", "greedy", "oracle")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


# Columns of the terminal table: it must fit 80 characters, so revenue, units and margin stay
# in report.md and evaluation.json.
# "checked" is the interval of the uplift checked on held-out price changes (calibration.py),
# the one the verdict uses; the ensemble's interval under the fitted model stays in report.md.
COMPACT_COLUMNS = ("policy", "profit", "uplift", "checked", "chg/mo", "viol.", "true profit",
                   "true uplift", "of oracle")
DROPPED_FROM_COMPACT = ("revenue", "units", "margin", "ensemble interval", "checked uplift")


def _interval_cell(entry: dict[str, Any] | None) -> str:
    """'[-3,+12]': the uplift interval in whole %, 'n/a' without one."""
    if entry is None or entry.get("low") is None:
        return "n/a"
    return f"[{entry['low']:+.0f},{entry['high']:+.0f}]"


def verdict_lines(evaluation: dict[str, Any]) -> list[str]:
    """The verdict as the first lines of every output: the call, every failed check, the
    products by status and, with ground truth, whether the interval covered the truth."""
    verdict = evaluation["verdict"]
    lines = [f"VERDICT: {verdict['message']}"]
    lines += [f"  - {reason}" for reason in verdict["reasons"][1:]]
    counts = verdict.get("products_by_status") or {}
    if counts:
        lines.append("  products: " + ", ".join(f"{n} {status.replace('_', ' ')}"
                                                 for status, n in sorted(counts.items())))
    truth = verdict.get("ground_truth")
    if truth:
        covered = truth["interval_covers_true_uplift"]
        share = truth["products_covered_share"]
        lines.append(
            f"  ground truth: true uplift {_fmt(truth['true_uplift_pct'], 1, '%')}; interval "
            + ("covers it" if covered else "n/a" if covered is None else "misses it")
            + (f" (per product: {share:.0%} covered)" if share is not None else "")
            + f"; elasticity fitted {_fmt(truth['elasticity_fitted_mean'], 2)} vs true "
            f"{_fmt(truth['elasticity_true_mean'], 2)}")
    return lines


def policy_rows(evaluation: dict[str, Any], compact: bool = False
                ) -> tuple[list[str], list[list[str]]]:
    """Header and one row of formatted cells per policy (for the terminal and report.md).

    The oracle's violation count carries a ``*``: it ignores the daily-change limit by design.
    """
    truth = evaluation["ground_truth"]["used"]
    level = "90%"
    interval = evaluation["policies"][evaluation["policy_order"][0]].get("checked_uplift")
    if interval:
        level = f"{interval['level']:.0%}"
    header = ["policy", "profit", "revenue", "units", "margin", "uplift",
              "ensemble interval", "checked uplift", f"checked {level} interval", "changes/mo",
              "violations", "true profit", "true uplift", "% of oracle"]
    rows = []
    for name in evaluation["policy_order"]:
        entry = evaluation["policies"][name]
        fitted, true = entry["fitted"], entry["true"] or {}
        violations = str(entry["violations"]["total"])
        if entry["exempt_from_daily_limit"]:
            violations += "*"
        rows.append([name, _fmt(fitted["profit"], 0), _fmt(fitted["revenue"], 0),
                     _fmt(fitted["units"], 0), _fmt(fitted["margin"] * 100, 1, "%"),
                     _fmt(fitted["uplift_pct"], 1, "%"),
                     _interval_cell(entry.get("uplift_interval")),
                     _fmt((entry.get("checked_uplift") or {}).get("point"), 1, "%"),
                     _interval_cell(entry.get("checked_uplift")),
                     _fmt(entry["price_changes_per_product_month"], 2), violations,
                     _fmt(true.get("profit"), 0), _fmt(true.get("uplift_pct"), 1, "%"),
                     _fmt(true.get("share_of_oracle_pct"), 1, "%")])
    keep = list(range(len(header) if truth else len(header) - 3))
    if compact:
        keep = [i for i in keep if header[i] not in DROPPED_FROM_COMPACT]
        header = list(COMPACT_COLUMNS[:len(keep)])
    else:
        header = [header[i] for i in keep]
    return header, [[row[i] for i in keep] for row in rows]


def exempt_footnote(evaluation: dict[str, Any]) -> str | None:
    """The footnote of the tables: what the oracle is exempt from, and change costs."""
    cost = float(evaluation.get("price_change_cost") or 0.0)
    notes = []
    if "oracle" in evaluation["policies"]:
        notes.append("* the oracle ignores the daily-change limit"
                     + (" and change costs" if cost else "") + " by design (exempt)")
    if cost:
        notes.append(f"profit is net of change costs ({cost:g} x mean best daily profit per "
                     "change)")
    return "\n".join(notes) or None


def policy_table(evaluation: dict[str, Any]) -> str:
    """The policy comparison as preformatted text of at most 80 columns.

    Profit, margin and uplift are under the fitted demand; the true-demand columns appear when
    ground truth is known.
    """
    header, rows = policy_rows(evaluation, compact=True)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [" ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in [header, *rows]]
    lines.insert(1, " ".join("-" * w for w in widths))
    footnote = exempt_footnote(evaluation)
    if footnote:
        lines.append(footnote)
    return "\n".join(lines)


def plot_profit_by_policy(path: Path, evaluation: dict[str, Any]) -> str:
    """Bar chart of each policy's profit (fitted demand, and true demand next to it if known)."""
    plt = _pyplot()
    names = evaluation["policy_order"]
    fitted = [evaluation["policies"][n]["fitted"]["profit"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        if evaluation["ground_truth"]["used"]:
            true = [evaluation["policies"][n]["true"]["profit"] for n in names]
            ax.bar(x - 0.2, fitted, 0.4, label="fitted demand")
            ax.bar(x + 0.2, true, 0.4, label="true demand")
            ax.legend(loc="lower right")
        else:
            ax.bar(x, fitted, 0.6, label="fitted demand")
        ax.set_xticks(x, names)
        ax.set_ylabel("expected profit over the split")
        ax.set_title(f"Profit by policy ({evaluation['split']} split)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path.name


def plot_price_paths(path: Path, meta: SplitMeta, policies: dict[str, np.ndarray],
                     n_products: int) -> str | None:
    """Price paths of the ``n_products`` products with the most historical revenue.

    Draws historical, agent, greedy and oracle prices (those present) against the date, with
    the product's [min_price, max_price] band.
    """
    if n_products == 0 or meta.n_rows == 0:
        return None
    plt = _pyplot()
    start, length = meta.series_start, meta.series_length
    revenue = np.add.reduceat(meta.price * meta.units, start)
    chosen = np.argsort(-revenue, kind="stable")[:n_products]
    height = 2.4 * len(chosen)
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, height), squeeze=False)
    try:
        for ax, series in zip(axes[:, 0], chosen, strict=True):
            rows = slice(start[series], start[series] + length[series])
            dates = meta.date[rows]
            for name in PATH_POLICIES:
                if name in policies:
                    ax.step(dates, policies[name][rows], where="post", label=name,
                            linestyle="--" if name == "oracle" else "-")
            ax.axhspan(meta.min_price[start[series]], meta.max_price[start[series]],
                       color="grey", alpha=0.1)
            ax.set_title(f"product {meta.product_id[start[series]]}", fontsize=9)
            ax.set_ylabel("price")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
        fig.autofmt_xdate()
        # Leave a strip at the top for the shared legend so it covers no line.
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path.name


def plot_uplift_histogram(path: Path, uplift: np.ndarray) -> str | None:
    """Histogram over products of the agent's profit uplift vs historical prices, in %."""
    values = uplift[np.isfinite(uplift)]
    if values.size == 0:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    try:
        ax.hist(values, bins=min(30, max(5, values.size // 2)))
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set_xlabel("agent profit uplift vs historical (%)")
        ax.set_ylabel("products")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path.name


def _interval_text(entry: dict[str, Any]) -> str:
    if entry.get("low") is None:
        return "no interval"
    return (f"{entry['level']:.0%} interval {entry['low']:+.1f}% to {entry['high']:+.1f}%")


def capped_lines(evaluation: dict[str, Any]) -> list[str]:
    """report.md's line on sales capped by stock at low prices (none when nothing was)."""
    censoring = (evaluation.get("demand_model") or {}).get("censoring") or {}
    low = censoring.get("low_price_days") or {}
    if not low.get("products"):
        return []
    how = ("stock bound on most of their low-price days" if low.get("pooled_dispersion") is None
           else f"their low-price sales are under-dispersed (pooled Pearson dispersion "
                f"{low['pooled_dispersion']:.2f}; Poisson sales give 1)")
    return [f"- Sales capped by stock: {low['products']} products' low-price days "
            f"({low['rows_left_out']} train rows, {low['low_price_cut']:.0%} or more below "
            f"the regular price) were left out of the demand fit: {how}."]


def held_out_lines(evaluation: dict[str, Any]) -> list[str]:
    """report.md's section on the held-out checks (overall numbers and the decile table)."""
    checks = evaluation.get("held_out_checks")
    if not checks:
        return []
    fit, changes = checks["fit"]["overall"], checks["price_changes"]["overall"]
    accuracy = changes["sign_accuracy"]
    lines = ["", "## Held-out checks of the demand model", "",
             f"On the {evaluation['split']} split at the prices actually charged:", "",
             f"- WMAPE of daily units {_fmt(fit['wmape'], 3)} (Poisson noise alone: "
             f"{_fmt(fit['wmape_noise_floor'], 3)}), bias {_fmt(fit['bias_pct'], 1, '%')} "
             "(total predicted vs actual units).",
             f"- {changes['price_changes']} price changes; predicted change in units had the "
             f"right sign in {_fmt(None if accuracy is None else accuracy * 100, 0, '%')} of "
             f"the {changes['with_sign']} with a sign, mean absolute error of the log ratio "
             f"{_fmt(changes['mean_abs_error'], 3)}, response slope (actual on predicted) "
             f"{_fmt(changes['response_slope'], 2)}; {checks['price_changes']['window_days']} "
             "days before and after each change.",
             *capped_lines(evaluation),
             "", "| decile | rows | mean predicted | mean actual |", "|---|---|---|---|"]
    lines += [f"| {c['decile']} | {c['rows']} | {c['mean_predicted']:.2f} | "
              f"{c['mean_actual']:.2f} |" for c in fit["calibration"]]
    return lines


def write_report_md(path: Path, evaluation: dict[str, Any], plots: dict[str, str]) -> None:
    """report.md: a short summary, the policy table and links to the plots."""
    agent = evaluation["policies"]["agent"]
    truth = evaluation["ground_truth"]["used"]
    measure = "true" if truth else "fitted"
    uplift = evaluation["agent_uplift_per_product_pct"][measure]
    verdict = verdict_lines(evaluation)
    lines = [
        f"# Pricing agent evaluation ({evaluation['split']} split)",
        "",
        f"**{verdict[0]}**",
        "",
        *[f"- {line.strip().removeprefix('- ')}" for line in verdict[1:]],
        *([""] if len(verdict) > 1 else []),
        "Every profit below is predicted by the fitted demand model; the verdict says whether "
        "its held-out checks back it (see the held-out checks section).",
        "",
        f"Run `{evaluation['run']}`, {evaluation['products']} products, "
        f"{evaluation['product_days']} product-days"
        + (f" from {evaluation['dates'][0]} to {evaluation['dates'][1]}"
           if evaluation["dates"] else "") + ".",
        "",
        f"- Agent profit uplift vs historical prices: "
        f"{_fmt(agent['fitted']['uplift_pct'], 1, '%')} under the fitted demand model"
        + (f" ({_interval_text(agent['uplift_interval'])} across the demand ensemble)"
           if agent.get("uplift_interval") else "")
        + (f", {_fmt(agent['true']['uplift_pct'], 1, '%')} under the true demand" if truth
           else "") + ".",
    ]
    checked = agent.get("checked_uplift")
    slope = (evaluation.get("held_out_checks") or {}).get("response_slope")
    if checked and slope:
        lines.append(
            f"- Checked against the split's own price changes (the figure the verdict uses): "
            f"{_fmt(checked['point'], 1, '%')} ({_interval_text(checked)}); actual units moved "
            f"{slope['pooled']:.2f}x as much as the model predicted over {slope['events']} "
            f"price changes (90%: {slope['pooled_90pct'][0]:.2f} to "
            f"{slope['pooled_90pct'][1]:.2f}).")
        if checked.get("shapes"):  # the shapes the held-out units could not tell apart
            shares = ", ".join(f"{name} {entry['share']:.0%}" for name, entry
                               in checked["shapes"].items() if entry["share"] > 0)
            lines.append(f"- Demand shape of the checked uplift: {checked['shape']} (share of "
                         f"the interval's draws by shape: {shares}).")
        cross = checked.get("cross_price")
        if cross and None not in (cross["extrapolated"]["point"],
                                  cross["held_out_range"]["point"]):
            lines.append(
                f"- Siblings' prices beyond the held-out range of the category price index: "
                f"{_fmt(cross['extrapolated']['point'], 1, '%')} with the cross-price term "
                f"extrapolated, {_fmt(cross['held_out_range']['point'], 1, '%')} with it held "
                f"at the range (the held-out days cannot tell them apart; half the draws "
                f"each).")
    if truth:
        lines.append(f"- Agent share of the oracle's profit (true demand): "
                     f"{_fmt(agent['true']['share_of_oracle_pct'], 1, '%')}.")
    improved = None if uplift["share_positive"] is None else uplift["share_positive"] * 100
    lines += [
        f"- Per product ({measure} demand): median uplift {_fmt(uplift['median'], 1, '%')}, "
        f"{_fmt(improved, 0, '%')} of products improved.",
        f"- Constraint violations of the agent: {agent['violations']['total']}.",
    ]
    if not truth and evaluation["ground_truth"]["note"]:
        lines.append(f"- Not scored under the true demand: {evaluation['ground_truth']['note']}.")
    header, rows = policy_rows(evaluation)
    lines += ["", "## Policies", "",
              "Profit, revenue, units and margin are expected values under the fitted demand "
              "model; uplift is relative to historical prices; changes/mo is price changes per "
              "product-month.", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    footnote = exempt_footnote(evaluation)
    if footnote:
        lines += ["", footnote.replace("*", "\\*", 1).replace("\n", "\n\n")]
    lines += held_out_lines(evaluation)
    from pricing_cli.agent.learning import curve_table_lines

    curve = evaluation.get("learning_curve") or {}
    lines += curve_table_lines(curve.get("rows"), curve.get("best_timesteps"))
    titles = {"profit_by_policy": "Profit by policy", "price_paths": "Price paths",
              "uplift_histogram": "Per-product uplift"}
    if plots:
        lines += ["", "## Plots", ""]
        for key, name in plots.items():
            lines += [f"### {titles.get(key, key)}", "", f"![{titles.get(key, key)}]({name})", ""]
    lines.append("Recommended prices for every product-day: [recommendations.csv]"
                 "(recommendations.csv). All numbers: [evaluation.json](evaluation.json).")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
