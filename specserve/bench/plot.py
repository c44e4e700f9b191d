"""PNG for a bench report: throughput per configuration, the backend cost curves, and how adaptive k and
acceptance move over one request of each prompt kind."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_report(report: dict, path: Path) -> Path:
    groups = list(report["summary"])
    configs = list(next(iter(report["summary"].values())))
    width = max(22, 8 + 0.9 * len(groups))
    fig, (grid, costs, timeline) = plt.subplots(1, 3, figsize=(width, 8), gridspec_kw={"width_ratios": [3, 1.4, 1.6]})

    # speed-up of every configuration (row) on every mode/kind (column): a table read at a glance
    speedups = [
        [report["summary"][g].get(c, {}).get("speedup_vs_llamacpp", float("nan")) for g in groups] for c in configs
    ]
    shown = grid.imshow(speedups, cmap="RdYlGn", vmin=0.5, vmax=3.0, aspect="auto")
    for row, values in enumerate(speedups):
        for column, value in enumerate(values):
            grid.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
    grid.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=8)
    grid.set_yticks(range(len(configs)), [_short(c) for c in configs], fontsize=8)
    fig.colorbar(shown, ax=grid, fraction=0.03, label="speed-up vs plain llama.cpp on the model's file")
    cpu = report["machine"]["cpu"]
    grid.set_title(
        f"Decode speed-up, {report['max_tokens']} new tokens per prompt, {cpu['model']}, {cpu['cores']} cores"
    )

    for name, row in report["cost_table"].items():
        ks = [1] + [int(key[1:]) for key in row if key.startswith("k")]
        rel = [1.0] + [row[key] for key in row if key.startswith("k")]
        costs.plot(ks, rel, marker="o", label=f"{name} ({row['ms_1']:.0f} ms/token)")
    costs.plot([1, 16], [1, 16], linestyle=":", color="grey", label="linear (no batching gain)")
    costs.set_xlabel("tokens appended in one call (k)")
    costs.set_ylabel("cost relative to 1 token")
    costs.set_title("Backend cost of a verify window")
    costs.legend(fontsize=7)
    _plot_adaptive(report, timeline)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(label: str, width: int = 64) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _plot_adaptive(report: dict, ax: plt.Axes) -> None:
    """Chosen k per step (solid) and acceptance over the last 8 windows that drafted (dashed), for the
    first greedy request of each prompt kind under the adaptive speculative row that drafted most."""
    adaptive = [r for r in report["runs"] if r["config"].endswith("k=auto") and r.get("windows")]
    if not adaptive:
        ax.set_visible(False)
        return
    drafted: dict[str, int] = {}
    for run in adaptive:
        drafted[run["config"]] = drafted.get(run["config"], 0) + run["drafted"]
    config = max(drafted, key=drafted.get)
    acceptance_axis = ax.twinx()
    kinds: dict[str, dict] = {}
    for run in adaptive:
        if run["config"] == config and run["mode"] == "greedy":
            kinds.setdefault(run["kind"], run)
    for color, (kind, run) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], kinds.items(), strict=False):
        ax.step(range(len(run["chosen_k"])), run["chosen_k"], where="post", color=color, label=kind)
        steps, rates, recent = [], [], []
        for step, (drafted, accepted) in enumerate(run["windows"]):
            if drafted:
                recent = [*recent[-7:], (drafted, accepted)]
                steps.append(step)
                rates.append(sum(a for _, a in recent) / sum(d for d, _ in recent))
        acceptance_axis.plot(steps, rates, linestyle="--", color=color, alpha=0.7)
    ax.set_xlabel("step (target pass)")
    ax.set_ylabel("chosen k (solid)")
    acceptance_axis.set_ylabel("acceptance, last 8 drafting windows (dashed)")
    acceptance_axis.set_ylim(0, 1.05)
    ax.set_title(f"Adaptive k, greedy: {config}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
