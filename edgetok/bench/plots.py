"""PNG plots of a bench's results (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def decode_vs_context(results: dict[str, Any], path: Path) -> Path:
    """Decode tokens/s (median, min–max as error bars) against context length, a line per system."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in results["systems"]:
        rows = [r for r in results["results"] if r["system"] == s["name"] and r["runs"]]
        if not rows:
            continue
        x = [r["context"] for r in rows]
        med = [r["decode_tokens_per_s"]["median"] for r in rows]
        err = [[m - r["decode_tokens_per_s"]["min"] for m, r in zip(med, rows)],
               [r["decode_tokens_per_s"]["max"] - m for m, r in zip(med, rows)]]
        ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label=s["name"], linestyle="--" if s["peer"] else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(results["settings"]["contexts"], [str(c) for c in results["settings"]["contexts"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tokens/s")
    ax.set_ylim(bottom=0)
    threads = results["settings"]["threads"]
    ax.set_title(f"{results['model']}: decode speed, {threads} thread{'s' if threads != 1 else ''}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _budget_order(budgets: list[str]) -> list[str]:
    if all(b.endswith("%") for b in budgets):
        return sorted(budgets, key=lambda b: -float(b[:-1]))
    return budgets


def decode_vs_budget(results: dict[str, Any], path: Path) -> Path | None:
    """Decode tokens/s against the KV budget (the exact run is 100 %), a line per context, with
    greedy agreement on a second axis. None when the bench had no budget below 100 %."""
    reference = results["systems"][0]["name"]
    by_budget = {"100%": reference} | {s["budget"]: s["name"] for s in results["systems"] if s["budget"]}
    if len(by_budget) < 2:
        return None
    budgets = _budget_order(list(by_budget))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax2 = ax.twinx()
    for i, c in enumerate(results["settings"]["contexts"]):
        rows = {r["system"]: r for r in results["results"] if r["context"] == c and r["runs"]}
        xs = [b for b in budgets if by_budget[b] in rows]
        if not xs:
            continue
        color = f"C{i}"
        ax.plot(xs, [rows[by_budget[b]]["decode_tokens_per_s"]["median"] for b in xs], "o-", color=color, label=f"{c} tokens: decode")
        agree = [(b, 1.0 if by_budget[b] == reference else (rows[by_budget[b]]["quality"] or {}).get("greedy_agreement")) for b in xs]
        agree = [(b, a) for b, a in agree if a is not None]
        ax2.plot([b for b, _ in agree], [100 * a for _, a in agree], "s:", color=color, label=f"{c} tokens: agreement")
    ax.set_xlabel("KV budget (share of the context each layer attends to)")
    ax.set_ylabel("decode tokens/s (solid)")
    ax.set_ylim(bottom=0)
    ax2.set_ylabel("greedy agreement with exact fp32, % (dotted)")
    ax2.set_ylim(0, 105)
    ax.set_title(f"{results['model']}: KV budget, speed and agreement")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [decode_vs_context(results, out / "decode_vs_context.png"), decode_vs_budget(results, out / "decode_vs_budget.png")]
    return [p for p in paths if p is not None]


def size_vs_kl(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """KL against fp32 (log) by bits per weight: edgetok's allocator as a line over its targets,
    each llama.cpp mix a point (hollow with an imatrix), the mix's name beside it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ours = sorted((r for r in rows if r["file"].startswith("edgetok")), key=lambda r: r["bits_per_weight"])
    ax.plot([r["bits_per_weight"] for r in ours], [r["kl_mean"] for r in ours], "o-", label="edgetok --target-bits")
    for imatrix in (False, True):
        theirs = [r for r in rows if r["file"].startswith("llama.cpp") and r["file"].endswith("imatrix") == imatrix]
        ax.plot([r["bits_per_weight"] for r in theirs], [r["kl_mean"] for r in theirs], "s", linestyle="none",
                color="tab:red", fillstyle="none" if imatrix else "full",
                label="llama.cpp's mixes" + (" + imatrix" if imatrix else ""))
        if not imatrix:
            for r in theirs:
                ax.annotate(r["file"].split()[1], (r["bits_per_weight"], r["kl_mean"]), textcoords="offset points",
                            xytext=(5, 3), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (2-D weights)")
    ax.set_ylabel("KL against fp32, mean of four kinds of text")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
