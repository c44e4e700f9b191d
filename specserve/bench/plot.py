"""PNG for a bench report: throughput per configuration, and the backend cost curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_report(report: dict, path: Path) -> Path:
    groups = [key for key in report["summary"] if not key.endswith("/all")]
    configs = list(next(iter(report["summary"].values())))
    fig, (bars, costs) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})

    width = 0.8 / len(configs)
    for i, config in enumerate(configs):
        values = [report["summary"][g][config]["tokens_per_s"] for g in groups]
        xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(groups))]
        drawn = bars.bar(xs, values, width, label=config)
        bars.bar_label(
            drawn,
            labels=[f"{report['summary'][g][config]['speedup_vs_fastest_target_only']:.2f}x" for g in groups],
            fontsize=7,
        )
    bars.set_xticks(range(len(groups)), groups)
    bars.set_ylabel("decode tokens/s (label: speed-up vs fastest target-only)")
    bars.set_title(f"{report['max_tokens']} new tokens per prompt, {report['machine']['cores']} cores")
    bars.legend(fontsize=8, loc="upper right")

    for name, row in report["cost_table"].items():
        ks = [1] + [int(key[1:]) for key in row if key.startswith("k")]
        rel = [1.0] + [row[key] for key in row if key.startswith("k")]
        costs.plot(ks, rel, marker="o", label=f"{name} ({row['ms_1']:.0f} ms/token)")
    costs.plot([1, 16], [1, 16], linestyle=":", color="grey", label="linear (no batching gain)")
    costs.set_xlabel("tokens appended in one call (k)")
    costs.set_ylabel("cost relative to 1 token")
    costs.set_title("Backend cost of a verify window")
    costs.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
