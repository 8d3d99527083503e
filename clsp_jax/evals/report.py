"""The one evaluation report (`python -m clsp_jax.eval --task all`): the paper's tables, ours beside its numbers.

Three tables laid out as the paper's (rows = tasks, columns = its metrics): retrieval on PSC test, zero-shot
classification, style similarity. Beside each of our numbers, the paper's CLSP number when the paper reports
it and our protocol matches the paper's; otherwise the cell is empty (the paper does not report it) or "n/c"
(not comparable: a deviation, listed under the tables). A set's protocol is read from the card that
data_prep.eval_sets writes beside its manifest; a set without a card, a set built by a non-paper protocol,
clips that failed to load, a prompt ensemble other than the authors' max, or clips shared with the training
data (the leakage check) are deviations.
"""

from __future__ import annotations

import math

# The paper's CLSP numbers (percent for R@1, mAP@10, WA, UA; correlations as they are), keyed by eval set and
# our metric name. A metric absent here is not reported in the paper.
PAPER = {
    "psc": {"global/s2t/R@1": 45.6, "global/t2s/R@1": 40.3, "global/s2t/mAP@10": 58.7,
            "finegrained/s2t/R@1": 68.1, "finegrained/t2s/R@1": 67.2},
    "iemocap": {"iemocap_emotion/WA": 57.2, "iemocap_emotion/UA": 56.1},
    "ravdess": {"ravdess_emotion/WA": 46.8, "ravdess_gender/WA": 100.0},
    "cremad": {"cremad_emotion/WA": 35.1, "cremad_age/WA": 40.6, "cremad_age/UA": 44.5},
    "similarity": {"intrinsic/pearson": 0.893, "intrinsic/spearman": 0.858, "intrinsic/kendall": 0.668,
                   "situational/pearson": 0.903, "situational/spearman": 0.878, "situational/kendall": 0.694},
}

# (title, columns (header, metric suffix), rows (label, eval set, metric prefix), percent)
TABLES = (
    ("Retrieval (PSC test)",
     (("S→T R@1", "s2t/R@1"), ("T→S R@1", "t2s/R@1"), ("S→T mAP@10", "s2t/mAP@10"),
      ("T→S mAP@10", "t2s/mAP@10")),
     (("global captions", "psc", "global/"), ("fine-grained captions", "psc", "finegrained/")), True),
    ("Zero-shot classification",
     (("WA", "WA"), ("UA", "UA")),
     (("IEMOCAP emotion (4)", "iemocap", "iemocap_emotion/"), ("RAVDESS emotion (8)", "ravdess", "ravdess_emotion/"),
      ("CREMA-D emotion (6)", "cremad", "cremad_emotion/"), ("RAVDESS gender", "ravdess", "ravdess_gender/"),
      ("CREMA-D age (4 bins)", "cremad", "cremad_age/")), True),
    ("Style similarity",
     (("Pearson r", "pearson"), ("Spearman ρ", "spearman"), ("Kendall τ", "kendall")),
     (("intrinsic", "similarity", "intrinsic/"), ("situational", "similarity", "situational/"),
      ("all pairs", "similarity", "all/")), False),
)


def deviations(entry: dict) -> list[str]:
    """How an evaluated set departs from the paper's protocol (empty: it follows it).

    entry: {"card": the set's card or None, "num_clips": cuts read, "num_failed": clips whose audio failed,
    "ensemble": zero-shot prompt ensemble (optional), "overlap": the leakage check's block (optional)}.
    """
    found = []
    card = entry.get("card")
    if card is None:
        found.append("no card beside the manifest: the protocol it was built by is not recorded")
    elif not card.get("paper_protocol"):
        found.append(f"protocol {card.get('protocol')!r}, not the paper's: {card.get('protocol_description')}")
    elif entry.get("num_clips") != card.get("num_cuts"):
        found.append(f"{entry.get('num_clips')} usable cuts in the manifest, {card.get('num_cuts')} on its card")
    if entry.get("num_failed"):
        found.append(f"{entry['num_failed']} of {entry.get('num_clips')} clips failed to load")
    if entry.get("ensemble", "max") != "max":
        found.append(f"prompt ensemble {entry['ensemble']!r} (the paper: the best prompt, max)")
    overlap = entry.get("overlap") or {}
    if overlap.get("checked") and not overlap.get("clean"):
        found.append(f"{overlap['eval_cuts_affected']} of {overlap['num_eval_cuts']} cuts overlap the training "
                     "data (leakage check)")
    return found


def _ours(value, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _paper(name: str, key: str, comparable: bool, percent: bool) -> str:
    value = PAPER.get(name, {}).get(key)
    if value is None:
        return ""
    if not comparable:
        return "n/c"
    return f"{value:.1f}" if percent else f"{value:.3f}"


def markdown(sets: dict) -> str:
    """The report's tables and notes. sets: eval set name -> {"metrics": {...}, "deviations": [...],
    "notes": [...]} for the sets that ran."""
    lines = []
    for title, columns, rows, percent in TABLES:
        header = ["task"] + [h for c, _ in columns for h in (c, "paper")] + ["protocol"]
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, name, prefix in rows:
            entry = sets.get(name)
            if entry is None:
                lines.append("| " + " | ".join([label] + [""] * (2 * len(columns)) + ["not run"]) + " |")
                continue
            comparable = not entry["deviations"]
            cells = [label]
            for _, suffix in columns:
                cells += [_ours(entry["metrics"].get(prefix + suffix), percent),
                          _paper(name, prefix + suffix, comparable, percent)]
            cells.append("as the paper" if comparable else "differs (see below)")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("paper: the paper's CLSP numbers; an empty paper cell: the paper does not report that number; "
                 "n/c: not comparable, our protocol differs.")
    for name, entry in sets.items():
        for text in entry["deviations"]:
            lines.append(f"- {name}: differs: {text}")
        for text in entry.get("notes", []):
            lines.append(f"- {name}: {text}")
    return "\n".join(lines) + "\n"
