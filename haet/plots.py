"""Figures from run records (matplotlib, PNG): learning curves, accuracy vs budget,
confusion matrices and Grad-CAM grids. Every function writes one file and returns its path."""

import os

import numpy as np


def check_figure_path(path, flag):
    """Checks that matplotlib can write a figure to `path` in the format its extension
    names (none: PNG), before the work that makes the figure.

    Raises:
        ValueError: an extension matplotlib cannot write, naming those it can.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    extension = os.path.splitext(path)[1][1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if extension and extension not in formats:
        raise ValueError(f"{flag}={path!r}: matplotlib cannot write .{extension} files. Use one of "
                         f"{', '.join('.' + e for e in sorted(formats))}.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _floats(rows, key):
    return [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in rows]


def plot_learning_curves(history, title, path, metadata=None):
    """Loss and accuracy vs epoch and vs elapsed seconds, in a 2x2 grid: training
    (blue) and, when the history has them, validation (orange) curves.

    Each panel carries the learning rate (red; log scale unless it reaches 0) and the
    augmentation strength (green, when recorded) on extra right-hand axes. Points are
    marked, so a run of one or two epochs still shows them; the legend sits below the
    panels, off the curves.

    Args:
        history: rows of `history.csv` (dicts with epoch, elapsed_seconds, loss,
            accuracy, learning_rate, augmentation_strength, and optionally val_loss,
            val_accuracy; values may be strings).
        title: figure title.
        path: PNG file to write.
        metadata: text to store in the PNG (matplotlib's `savefig` metadata), e.g.
            the mark by which `haet.report` knows its own figures.
    """
    plt = _pyplot()
    epochs = _floats(history, "epoch")
    seconds = _floats(history, "elapsed_seconds")
    lr = _floats(history, "learning_rate")
    strength = _floats(history, "augmentation_strength")
    marker = "o-" if len(history) < 60 else "-"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    handles = {}
    for row, key in enumerate(("loss", "accuracy")):
        for col, (x, xlabel) in enumerate(((epochs, "epoch"), (seconds, "elapsed training time (s)"))):
            ax = axes[row][col]
            for name, color, values in ((f"training {key}", "C0", _floats(history, key)),
                                        (f"validation {key}", "C1", _floats(history, f"val_{key}"))):
                if not np.all(np.isnan(values)):
                    (handles[name],) = ax.plot(x, values, marker, color=color, ms=4, label=name)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            if len(x) == 1:  # one point: give the axis a width
                ax.set_xlim(x[0] * 0.5 - 0.5, x[0] * 1.5 + 0.5)
            lr_ax = ax.twinx()
            (handles["learning rate (at epoch ends)"],) = lr_ax.plot(
                x, lr, "s--", color="C3", ms=3, label="learning rate (at epoch ends)")
            # Log scale shows step decays; a one-cycle schedule ends at 0, which it cannot.
            if all(v > 0 for v in lr):
                lr_ax.set_yscale("log")
            lr_ax.set_ylabel("learning rate", color="C3")
            if not np.all(np.isnan(strength)):
                s_ax = ax.twinx()
                s_ax.spines["right"].set_position(("axes", 1.14))
                (handles["augmentation strength (at epoch ends)"],) = s_ax.plot(
                    x, strength, "^--", color="C2", ms=3, label="augmentation strength (at epoch ends)")
                s_ax.set_ylim(-0.05, 1.05)
                s_ax.set_ylabel("augmentation strength", color="C2")
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 4),
               fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.savefig(path, dpi=90, metadata=metadata)
    plt.close(fig)
    return path


def plot_accuracy_vs_budget(runs, published, path, title="Test accuracy vs wall-clock budget", metadata=None):
    """Test accuracy of runs against their budget, with published points.

    Args:
        runs: dicts with `budget_seconds`, `test_accuracy` (fraction), `label`
            (one series per label, e.g. "resnet20x6, H100, jax").
        published: dicts with `budget_seconds`, `test_accuracy`, `entry`, `device`.
        path: PNG file to write.
        metadata: text to store in the PNG (see `plot_learning_curves`).
    """
    plt = _pyplot()
    labels = sorted({r["label"] for r in runs})
    fig, ax = plt.subplots(figsize=(9, 5 + 0.22 * (len(labels) + 1)), constrained_layout=True)
    # 20 colours times 5 markers: every series looks different up to 100 of them.
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v"
    for i, label in enumerate(labels):
        pts = [r for r in runs if r["label"] == label]
        ax.plot([r["budget_seconds"] for r in pts], [100 * r["test_accuracy"] for r in pts],
                markers[(i // len(colors)) % len(markers)], color=colors[i % len(colors)], alpha=0.85,
                label=f"haet: {label}")
    for k, p in enumerate(sorted(published, key=lambda p: p["test_accuracy"])):
        ax.plot(p["budget_seconds"], 100 * p["test_accuracy"], "*", ms=14, color="black")
        # Labels of nearby points alternate below and above them.
        ax.annotate(f"{p['entry']} ({p['dataset']} {p['train_examples'] or '?'}, {p['device']})",
                    (p["budget_seconds"], 100 * p["test_accuracy"]), textcoords="offset points",
                    xytext=(-10, -12 if k % 2 == 0 else 6), ha="right", fontsize=8)
    if published:
        ax.plot([], [], "*", ms=12, color="black", label="published")
    ax.set_xscale("log")
    budgets = sorted({r["budget_seconds"] for r in runs} | {p["budget_seconds"] for p in published})
    ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("training budget (s, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    # Below the axes: with many series an inside legend hides the points.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    ax.set_title(title)
    fig.savefig(path, dpi=100, metadata=metadata)
    plt.close(fig)
    return path


def plot_confusion_matrix(matrix, class_names, path, title="Confusion matrix", metadata=None):
    """Row-normalized confusion matrix (true class rows, predicted class columns),
    with the counts written in each cell; `metadata`: text to store in the PNG (see
    `plot_learning_curves`)."""
    plt = _pyplot()
    matrix = np.asarray(matrix, dtype=np.int64)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.65 * n, 0.6 + 0.6 * n), constrained_layout=True)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, label="fraction of the true class")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100, metadata=metadata)
    plt.close(fig)
    return path


def _short_name(name, width=12):
    name = str(name)
    return name if len(name) <= width else name[:width - 1] + "…"


def plot_grad_cam_grid(images, heatmaps, true_labels, predicted_labels, class_names, path,
                       title="Grad-CAM", columns=8):
    """A grid of images with their Grad-CAM heatmaps overlaid.

    Args:
        images: uint8 `(N, H, W, C)`.
        heatmaps: float `(N, H, W)` in [0, 1].
        true_labels, predicted_labels: int `(N,)`.
        class_names: names by label.
        path: PNG file to write.
    """
    plt = _pyplot()
    n = len(images)
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k in range(n):
        ax = axes[k // columns][k % columns]
        image = images[k]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
        ax.imshow(heatmaps[k], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ok = true_labels[k] == predicted_labels[k]
        ax.set_title(f"pred {_short_name(class_names[predicted_labels[k]])}\n"
                     f"true {_short_name(class_names[true_labels[k]])}", fontsize=7, color="green" if ok else "red",
                     pad=2)
    fig.suptitle(title + " (green: correct, red: wrong)")
    fig.tight_layout(h_pad=1.2, w_pad=0.6)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.path.abspath(path)
