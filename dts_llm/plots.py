"""Figures of training runs, drawn off-screen: temperature, KD loss and CE loss over steps, side by side.

The quickstart and the sweep draw the same three panels; the teacher report draws its own with ``pyplot``.
"""

from __future__ import annotations

from pathlib import Path

TRAJECTORY_PANELS = (("temperature", "temperature T"), ("kd_loss", "KD loss (x T^2)"), ("ce_loss", "student CE loss"))


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend: commands run where no display is."""
    # Imported when a figure is drawn: matplotlib adds about a second to the start of every command.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_trajectories(
    trajectories: dict[str, list[dict]], path: Path, line_styles: dict[str, object] | None = None
) -> None:
    """One line per run (``{label: logged steps with step, temperature, kd_loss, ce_loss}``) in each panel;
    temperature on a log2 axis, so that 1, 2, 4, ... are evenly spaced. ``line_styles`` by label."""
    from matplotlib.ticker import FuncFormatter

    plt = pyplot()
    figure, axes = plt.subplots(1, len(TRAJECTORY_PANELS), figsize=(15, 3.8))
    for label, steps in trajectories.items():
        style = (line_styles or {}).get(label, "-")
        for axis, (key, _) in zip(axes, TRAJECTORY_PANELS, strict=False):
            axis.plot([step["step"] for step in steps], [step[key] for step in steps], linestyle=style, label=label)
    for axis, (_, title) in zip(axes, TRAJECTORY_PANELS, strict=False):
        axis.set(title=title, xlabel="optimizer step")
    axes[0].set_yscale("log", base=2)
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    figure.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize="small")
    figure.tight_layout(rect=(0, 0, 0.91, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
