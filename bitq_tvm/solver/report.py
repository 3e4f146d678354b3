"""The planner's report: Pareto-front and per-layer bit-map plots (PNG) and markdown tables."""

from __future__ import annotations

import os

from ..support.atomic import write_text
from ..support.tables import format_table
from .planner import PlanResult, Verification


def _loss_text(result: PlanResult, mse: float) -> str:
    acc = result.accuracy
    return f"{acc.to_user_units(mse) * 100:.2f}%" if acc.curve else f"{mse:.3e}"


def layer_table(result: PlanResult) -> str:
    """Markdown: per layer the chosen formats, predicted loss, DRAM traffic, cost and weight bytes."""
    rows = []
    for name, label in result.allocation.as_dict().items():
        lf = result.plan.layers[name]
        info = lf.info
        rows.append((name, label, "fp32" if lf.weight is None else lf.weight.name,
                     "fp32" if lf.activation is None else lf.activation.name, f"{info['predicted_loss']:.3e}",
                     f"{info['dram_bytes']:,.0f}", f"{info['perf']:.4g}", f"{info['weight_bytes']:,}"))
    return format_table(["layer", "candidate", "weight", "activation", "pred. logit MSE", "DRAM bytes",
                        f"perf ({result.performance.unit})", "weight bytes"], rows)


def comparison_table(result: PlanResult) -> str:
    """Markdown: the chosen plan against every uniform allocation."""
    unit = result.accuracy.unit
    rows = []
    for label, allocation in [("**plan**", result.allocation), *result.uniforms]:
        rows.append((label, _loss_text(result, allocation.acc_loss), f"{allocation.acc_loss:.3e}",
                     f"{allocation.perf:.4g}", f"{result.dram_bytes(allocation):,.0f}",
                     f"{result.average_weight_bits(allocation):.2f}"))
    return format_table(["allocation", f"pred. {unit}", "pred. logit MSE", "perf", "DRAM bytes", "weight bits/param"],
                       rows)


def verification_table(checks: dict[str, Verification]) -> str:
    """Markdown: predicted vs measured loss per checked plan."""
    rows = []
    for name, v in checks.items():
        rows.append((name, f"{v.predicted_logit_mse:.3e}", f"{v.measured_logit_mse:.3e}", f"{v.ratio:.2f}",
                     f"{v.predicted * 100:.2f}%" if v.unit == "top-1 drop" else "-",
                     f"{v.measured * 100:.2f}%" if v.unit == "top-1 drop" else "-", f"{v.agreement * 100:.2f}%"))
    return format_table(["plan", "pred. logit MSE", "meas. logit MSE", "meas/pred", "pred. top-1 drop",
                        "meas. top-1 drop", "argmax agreement"], rows)


def plot_pareto(result: PlanResult, path: str) -> None:
    """Predicted loss vs perf: the Pareto front, the uniform allocations and the chosen plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    front = sorted(result.front, key=lambda a: a.perf)
    ax.plot([a.perf for a in front], [a.acc_loss for a in front], "-o", color="tab:blue", ms=4,
            label="Pareto front (lambda sweep)")
    for label, a in result.uniforms:
        ax.scatter(a.perf, a.acc_loss, marker="s", color="tab:gray", s=28, zorder=3)
        ax.annotate(label, (a.perf, a.acc_loss), textcoords="offset points", xytext=(4, 3), fontsize=6, color="dimgray")
    ax.scatter([], [], marker="s", color="tab:gray", label="uniform allocations")
    chosen = result.allocation
    ax.scatter(chosen.perf, chosen.acc_loss, marker="*", s=220, color="tab:red", zorder=4,
               label=f"chosen plan ({result.objective.describe(result.accuracy.unit)})")
    ax.set_yscale("log")
    ax.set_xlabel(f"performance cost ({result.performance.unit}, target {result.target})")
    ax.set_ylabel("predicted loss (relative logit MSE)")
    ax.set_title(f"{result.model.name}: predicted accuracy loss vs performance")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bitmap(result: PlanResult, path: str) -> None:
    """Per layer: chosen weight and activation mantissa bits (bars) and block size (annotation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(result.allocation.layer_names)
    w_bits, a_bits, blocks = [], [], []
    for name in names:
        lf = result.plan.layers[name]
        w_bits.append(32 if lf.weight is None else lf.weight.mantissa_bits)
        a_bits.append(32 if lf.activation is None else lf.activation.mantissa_bits)
        blocks.append("fp32" if lf.weight is None else f"B{lf.weight.block_size}")
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.5), dpi=110)
    ax.bar(x - 0.2, np.minimum(w_bits, 9), 0.4, label="weight mantissa bits", color="tab:blue")
    ax.bar(x + 0.2, np.minimum(a_bits, 9), 0.4, label="activation mantissa bits", color="tab:orange")
    for i, text in enumerate(blocks):
        ax.text(x[i], 8.6, text, ha="center", va="bottom", fontsize=7, rotation=90 if len(names) > 12 else 0)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                       fontsize=7 if len(names) > 12 else 9)
    ax.set_ylim(0, 10.5)
    ax.set_yticks(range(0, 9))
    ax.set_ylabel("mantissa bits (fp32 drawn as 9)")
    ax.set_title(f"{result.model.name}: per-layer BFP allocation (block size above the bars)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(result: PlanResult, directory: str, checks: dict[str, Verification] | None = None) -> list[str]:
    """Write ``pareto.png``, ``bitmap.png`` and ``report.md`` into ``directory``; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    pareto, bitmap, markdown = (os.path.join(directory, f) for f in ("pareto.png", "bitmap.png", "report.md"))
    plot_pareto(result, pareto)
    plot_bitmap(result, bitmap)
    acc = result.accuracy
    lines = [f"# BitQ plan for {result.model.name} on {result.target}", "",
             f"Objective: {result.objective.describe(acc.unit)}. Accuracy term measured on {acc.n_samples} "
             f"calibration samples ({acc.noise_kind} noise injection); loss unit: {acc.unit}.", "",
             "![Pareto front](pareto.png)", "", "![Per-layer allocation](bitmap.png)", "",
             "## Chosen allocation", "", layer_table(result), "",
             "## Plan vs uniform allocations (predicted)", "", comparison_table(result), ""]
    if checks:
        lines += ["## Predicted vs measured (TVM BFP simulation)", "", verification_table(checks), ""]
    write_text(markdown, "\n".join(lines))
    return [pareto, bitmap, markdown]
