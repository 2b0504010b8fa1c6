"""The adapt runner's outputs from its result rows: results.md (one markdown table) and a PNG plot of test
accuracy against labels per class (one panel per method entry, one line per model row, ± std bars)."""

from __future__ import annotations

from pathlib import Path

ROW_NAMES = {"pretrained": "pretrained", "random_init": "random init", "raw_pixels": "raw pixels"}


def column_label(col: int | str, num_train: int) -> str:
    return f"all ({num_train})" if col == "all" else f"{col}/class"


def cell(r: dict) -> str:
    if len(r["per_seed"]) > 1:
        return f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"
    return f"{100 * r['mean']:.1f}"


def params_cell(r: dict) -> str:
    run = r["runs"][0]
    trainable, total = run.get("trainable_params"), run.get("total_params")
    if trainable is None:
        return ""
    if total:
        return f"{trainable:,} ({100 * trainable / total:.2f} %)"
    return f"{trainable:,}"


def markdown(res: dict) -> str:
    """The results as one markdown table: rows (model row, method entry), columns the label counts."""
    cols = res["columns"]
    head = ["model", "method"] + [column_label(c, res["num_train"]) for c in cols] + ["trainable params"]
    lines = [
        f"Test accuracy % (mean ± std over {res['seeds']} label subsets; 'all': one run) — encoder "
        f"`{res['encoder']}`, {res['num_test']} test examples, {res['num_classes']} classes.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    groups: dict[tuple[str, str], dict] = {}
    for r in res["results"]:
        groups.setdefault((r["row"], r["entry"]), {})[r["labels_per_class"]] = r
    for (row, entry), by_col in groups.items():
        cells = [cell(by_col[c]) if c in by_col else "–" for c in cols]
        last = by_col[cols[-1]] if cols[-1] in by_col else next(iter(by_col.values()))
        lines.append("| " + " | ".join([ROW_NAMES.get(row, row), entry, *cells, params_cell(last)]) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str | Path) -> None:
    """accuracy vs labels per class; 'all' drawn at num_train / num_classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = list(dict.fromkeys(r["entry"] for r in res["results"]))
    fig, axes = plt.subplots(1, len(entries), figsize=(4.2 * len(entries), 3.6), squeeze=False, sharey=True)
    per_class_all = res["num_train"] / res["num_classes"]
    for ax, entry in zip(axes[0], entries):
        for row in dict.fromkeys(r["row"] for r in res["results"] if r["entry"] == entry):
            pts = [r for r in res["results"] if r["entry"] == entry and r["row"] == row]
            xs = [per_class_all if r["labels_per_class"] == "all" else r["labels_per_class"] for r in pts]
            ax.errorbar(
                xs,
                [100 * r["mean"] for r in pts],
                yerr=[100 * r["std"] for r in pts],
                marker="o",
                capsize=3,
                label=ROW_NAMES.get(row, row),
            )
        ax.set_xscale("log")
        ax.set_title(entry)
        ax.set_xlabel("labels per class ('all' at the right)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy %")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
