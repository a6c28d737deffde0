"""``icm report``: one self-contained HTML page for a label run, a pairs file or a transfer run.

The kind is found from the files present: ``transfer.json`` (a transfer directory), ``run.json`` (a label run
directory) or ``NAME.report.json`` written by ``icm pairs`` (given as the file, its Parquet, or a directory
holding exactly one). Plots are drawn with matplotlib (Agg), written as PNGs next to the page and inlined in it
as base64, so the page has no external reference and can be mailed or archived as one file.

It lives in ``dpo/`` because it reads the outputs of every stage and ``dpo/`` already sits on top of the other
packages (``data`` <- ``icm`` <- ``dpo``: ``dpo/transfer.py`` runs them all); nothing in ``data/`` or ``icm/``
needs to know about reports, and the transfer plot is reused from ``dpo/transfer.py`` rather than redrawn.
"""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icm.data.io import InputError, atomic_path, check_output, read_json, read_records, scrub
from icm.data.pairs import split_paths

KINDS = ("label", "pairs", "transfer")
NOT_A_RUN = ("not a label run directory (run.json) or labels file beside one, a pairs report (NAME.report.json "
             "from icm pairs) or a transfer directory (transfer.json)")
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       color: #1f2933; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em;
     border-bottom: 1px solid #d9e2ec; padding-bottom: 0.2em; } h3 { font-size: 1.05em; }
.sub { color: #52606d; margin-top: 0; } code { background: #f0f4f8; padding: 0 0.3em; border-radius: 3px; }
nav a { margin-right: 1em; } table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d9e2ec; padding: 0.25em 0.7em; text-align: right; }
th { background: #f0f4f8; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #e4e7eb; margin: 0.5em 0; } .note { color: #8d2b0b; }
.row { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
"""
TITLES = {"label": "label run", "pairs": "preference pairs", "transfer": "transfer run"}
RERUN = "rerun the command that wrote it"
PAIRS_REPORT_KEYS = ("rows", "questions", "label_balance", "candidate_pairs", "pairs", "questions_with_pairs",
                     "pairs_per_question", "questions_skipped", "dropped")


@dataclass
class Page:
    """The sections of the page being built and where its PNGs go."""

    output: Path
    sections: list[tuple[str, str, str]] = field(default_factory=list)
    """(anchor, title, HTML body) in page order."""
    images: list[Path] = field(default_factory=list)

    def add(self, anchor: str, title: str, body: str) -> None:
        self.sections.append((anchor, title, body))

    def figure(self, fig, name: str) -> str:
        """Write ``fig`` as ``OUTPUT-name.png`` (atomic) and return an ``<img>`` with the PNG inlined."""
        import matplotlib.pyplot as plt

        path = self.output.with_name(f"{self.output.stem}-{name}.png")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        return self.image(path, name)

    def image(self, path: Path, name: str) -> str:
        self.images.append(path)
        data = base64.b64encode(path.read_bytes()).decode()
        return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'

    def render(self, title: str, subtitle: str) -> str:
        nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in self.sections)
        body = "\n".join(f'<section id="{a}">\n<h2>{html.escape(t)}</h2>\n{b}\n</section>' for a, t, b in self.sections)
        return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}'
                f'</title>\n<style>{CSS}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n'
                f'<p class="sub">{html.escape(subtitle)}</p>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n')


# -- finding what the path is ----------------------------------------------------------------------------------


def _is_pairs_report(path: Path) -> bool:
    try:
        report = read_json(path, keys=())
        return isinstance(report, dict) and ("pairs_per_question" in report or report.get("format") == "kto")
    except InputError:  # not a file, not JSON, not an object: not a pairs report
        return False


def detect(path: str | Path) -> tuple[str, Path]:
    """The kind of run at ``path`` and the file or directory to read: (``transfer``, dir), (``label``, dir) or
    (``pairs``, NAME.report.json). Anything else is an :class:`InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or directory")
    if path.is_file():
        if path.name in ("transfer.json", "run.json"):
            return ("transfer" if path.name == "transfer.json" else "label"), path.parent
        report = split_paths(path)["report"] if path.suffix == ".parquet" else path
        if report.name.endswith(".report.json") and _is_pairs_report(report):
            return "pairs", report
        if path.suffix == ".parquet" and (path.with_suffix(".run") / "run.json").is_file():  # icm label's labels
            return "label", path.with_suffix(".run")
        raise InputError(path, NOT_A_RUN)
    if (path / "transfer.json").is_file():
        return "transfer", path
    if (path / "run.json").is_file():
        return "label", path
    reports = [p for p in sorted(path.glob("*.report.json")) if _is_pairs_report(p)]
    if len(reports) == 1:
        return "pairs", reports[0]
    if reports:
        raise InputError(path, f"holds {len(reports)} pairs reports ({', '.join(p.name for p in reports)}); "
                               "give one of them")
    raise InputError(path, NOT_A_RUN)


def default_output(kind: str, target: Path) -> Path:
    """RUN_DIR/report.html, or NAME.report.html next to a pairs report."""
    if kind == "pairs":
        return target.with_name(target.name.removesuffix(".report.json") + ".report.html")
    return target / "report.html"


# -- small HTML helpers ----------------------------------------------------------------------------------------


def _fmt(value: Any, share: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.1%}" if share else f"{value:,.3f}"
    return str(value)


def table(rows: list[tuple[str, Any]] | list[list[Any]], header: list[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _integer_axis(axis) -> None:
    """Counts on ``axis`` (an x or y axis): whole-number ticks only."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _example(rows: list[tuple[str, Any]]) -> str:
    """One example record as a two-column table, long texts kept whole (wrapped), for a reader to see the data."""
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td style='text-align:left;white-space:pre-wrap'>"
                    f"{html.escape(_fmt(v))}</td></tr>" for k, v in rows if v is not None)
    return f"<table>{cells}</table>"


def _text(value: Any) -> Any:
    """A message list (conversational pairs) as its contents; anything else unchanged."""
    if isinstance(value, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in value)
    return value


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- a label run -----------------------------------------------------------------------------------------------


def _labels_file(run_dir: Path, run: dict[str, Any]) -> Path | None:
    """The labelled claims: ``claims.json`` (answer/pivot claims) or the output Parquet, wherever it was
    written relative to the run directory."""
    if (run_dir / "claims.json").is_file():
        return run_dir / "claims.json"
    output = Path(run.get("output") or "")
    for candidate in (output, run_dir.parent / output.name, run_dir.with_suffix(".parquet")):
        if candidate.name and candidate.is_file():
            return candidate
    return None


def rolling_acceptance(outcomes: list[int], window: int = 16) -> tuple[list[int], list[float]]:
    """Acceptance over the last ``window`` proposals at each step that made one (outcome 1 accepted, 0 rejected,
    -1 no proposal)."""
    steps, rates, recent = [], [], []
    for step, outcome in enumerate(outcomes, start=1):
        if outcome < 0:
            continue
        recent = (recent + [outcome])[-window:]
        steps.append(step)
        rates.append(sum(recent) / len(recent))
    return steps, rates


def calibration(scores: np.ndarray, gold: np.ndarray, bins: int = 8) -> list[tuple[float, float, int]]:
    """(mean predicted P(True), observed share of gold True, count) per equal-count bin of sigmoid(score)."""
    p = 1 / (1 + np.exp(-scores))
    order = np.argsort(p, kind="stable")
    return [(float(p[chunk].mean()), float(gold[chunk].mean()), len(chunk))
            for chunk in np.array_split(order, min(bins, len(order))) if len(chunk)]


def quality_table(quality: dict[str, Any]) -> str:
    """The ``quality`` object of run.json (:mod:`icm.quality`) as HTML: restart agreement, low-margin share, the
    surface-feature audit (accuracy of each feature alone vs the majority share) and the warnings."""
    agree, surface = quality.get("agreement"), quality["surface"]
    rows = [("restarts", agree["restarts"] if agree else 1),
            ("mean restart agreement", _fmt(agree["mean"], share=True) if agree else "- (one restart)"),
            ("claims the restarts disagree on", _fmt(agree["share_below_1"], share=True) if agree else "-"),
            (f"low-margin labels (|icm_score| < {quality['low_margin'].get('threshold_sd', '')} sd = "
             f"{quality['low_margin']['threshold']:.3g})",
             _fmt(quality["low_margin"]["share"], share=True)),
            ("majority share", _fmt(surface["majority_share"], share=True))]
    rows += [(f"predicted by {name} alone" + (f" ('{surface['cue_phrase']}')" if name == "cue" else ""),
              _fmt(accuracy, share=True)) for name, accuracy in surface["features"].items()]
    rows += [("quality score (ranks runs; not an accuracy)", _fmt(quality["score"]))]
    body = table(rows)
    if quality.get("warnings"):
        body += "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in quality["warnings"]) + "</ul>"
    return body


def label_sections(page: Page, run_dir: Path, prefix: str = "", title: str = "") -> None:
    """Summary, search (U and acceptance per step), label balance, scores by label and by gold, calibration."""
    plt = _pyplot()
    run = read_json(run_dir / "run.json", RERUN, keys=())
    rows = [("model", run.get("model")), ("input", run.get("input")), ("claims", run.get("claims")),
            ("searched by ICM", run.get("searched")), ("batches", run.get("batches")),
            ("True share of the labels", _fmt(run.get("true_share"), share=True)),
            ("inconsistencies / constraints", f"{run.get('inconsistencies')} / {run.get('constraints')}"),
            ("acceptance", _fmt(run.get("acceptance_rate"), share=True)),
            ("gold accuracy", _fmt(run.get("gold_accuracy"), share=True)),
            ("gold accuracy, searched claims", _fmt(run.get("gold_accuracy_searched"), share=True)),
            ("gold True share", _fmt(run.get("gold_true_share"), share=True)),
            ("seconds", run.get("seconds")), ("forward tokens per claim", run.get("forward_tokens_per_claim"))]
    body = table([r for r in rows if r[1] is not None])
    if run.get("command"):
        body += f"<p>Command: <code>{html.escape(run['command'])}</code></p>"
    if iterative := run.get("iterative"):
        body += "<h3>Iterative ICM, per batch</h3>" + table(
            [[b + 1, x["claims"], x["labeller"], x.get("trained_on"), x.get("loss_first"), x.get("loss_last"),
              _fmt(x["true_share"], share=True), _fmt(x.get("gold_accuracy"), share=True)]
             for b, x in enumerate(iterative["batches"])],
            ["batch", "claims", "labelled by", "fine-tuned on", "LoRA loss first", "last", "True share",
             "gold accuracy"])
    page.add(f"{prefix}summary", f"{title}Label run", body)
    if quality := run.get("quality"):
        page.add(f"{prefix}quality", f"{title}Label quality (no gold read)", quality_table(quality))

    trajectories, outcomes = run.get("trajectories") or [], run.get("outcomes") or []
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.6))
    for b, trajectory in enumerate(trajectories):
        ax.plot(range(len(trajectory)), trajectory, lw=1.2, label=f"batch {b + 1}")
    ax.set(xlabel="step", ylabel="U = alpha * predictability - inconsistencies", title="utility U over the search")
    ax.ticklabel_format(axis="y", useOffset=False)
    note = ""
    if any(outcomes):
        for b, steps in enumerate(outcomes):
            x, y = rolling_acceptance(steps)
            bx.plot(x, y, lw=1.2, label=f"batch {b + 1}")
        bx.set_ylim(-0.03, 1.03)
    else:
        note = ("<p class='note'>This run did not record per-step acceptance (written by an older icm); overall "
                f"acceptance {_fmt(run.get('acceptance_rate'), share=True)}.</p>")
        bx.text(0.5, 0.5, "per-step acceptance not recorded", ha="center", va="center", transform=bx.transAxes)
    bx.set(xlabel="step", ylabel="accepted share", title="acceptance (last 16 proposals)")
    for axis in (ax, bx):
        if 1 < len(trajectories) <= 8:
            axis.legend(fontsize=8)
    every = (run.get("config") or {}).get("exact_every")
    exactness = ("Every step's U is exact (<code>exact_every</code> 1)." if every == 1 else
                 f"Between exact steps (every {every or '<code>exact_every</code>'} steps) U is the approximate "
                 "one, so it can jump when an exact step catches up.")
    page.add(f"{prefix}search", f"{title}Search: U and acceptance", page.figure(fig, f"{prefix}search") + note
             + f"<p>{exactness} Steps after the annealing are greedy polishing (T = 0); a flat U at the end means "
               "no single flip improves it.</p>")

    labels_path = _labels_file(run_dir, run)
    if labels_path is None:
        page.add(f"{prefix}labels", f"{title}Labels", "<p class='note'>The labels file was not found next to the run "
                 "directory; scores are not shown.</p>")
        return
    records = read_records(labels_path)
    labels = np.array([bool(r["icm_label"]) for r in records])
    scores = np.array([float(r["icm_score"]) for r in records])
    gold_rows = [i for i, r in enumerate(records) if r.get("label") is not None]
    gold = np.array([bool(records[i]["label"]) for i in gold_rows])
    panels = 3 if gold_rows else 2
    fig, axes = plt.subplots(1, panels, figsize=(11, 3.6), gridspec_kw={"width_ratios": [0.6] + [1] * (panels - 1)})
    counts = {"ICM": (int(labels.sum()), int((~labels).sum()))}
    if gold_rows:
        counts["gold"] = (int(gold.sum()), int((~gold).sum()))
    for k, (t, f) in enumerate(counts.values()):
        axes[0].bar([k - 0.2], [t], 0.4, color="#2f855a", label="True" if k == 0 else None)
        axes[0].bar([k + 0.2], [f], 0.4, color="#c53030", label="False" if k == 0 else None)
    axes[0].set_xticks(range(len(counts)), list(counts))
    axes[0].set(ylabel="claims", title="label balance", ylim=(0, 1.3 * max(max(c) for c in counts.values())))
    axes[0].legend(fontsize=8, ncol=2, loc="upper center")
    for axis in axes:
        _integer_axis(axis.yaxis)
    edges = np.histogram_bin_edges(scores, bins=24)
    axes[1].hist([scores[labels], scores[~labels]], bins=edges, color=["#2f855a", "#c53030"], label=["True", "False"],
                 histtype="stepfilled", alpha=0.55)
    axes[1].set(xlabel="icm_score (log-odds True vs False)", ylabel="claims", title="score by ICM label")
    axes[1].legend(fontsize=8)
    if gold_rows:
        s = scores[gold_rows]
        axes[2].hist([s[gold], s[~gold]], bins=edges, color=["#2b6cb0", "#dd6b20"], label=["gold True", "gold False"],
                     histtype="stepfilled", alpha=0.55)
        axes[2].set(xlabel="icm_score", ylabel="claims", title="score by gold label")
        axes[2].legend(fontsize=8)
    body = page.figure(fig, f"{prefix}labels") + f"<p>Labelled claims read from <code>{html.escape(labels_path.name)}"
    body += f"</code>: {len(records)}, {int(labels.sum())} True.</p>"
    page.add(f"{prefix}labels", f"{title}Label balance and scores", body)
    example = next((r for r in records if r.get("label") is not None), records[0]) if records else None
    if example is not None:
        page.add(f"{prefix}example", f"{title}An example claim", _example([
            ("question", example.get("question")), ("claim", example.get("choice")),
            ("compared with", example.get("choice_2") or None), ("ICM label", example.get("icm_label")),
            ("icm_score", example.get("icm_score")), ("gold label", example.get("label"))]))
    if not gold_rows:
        return
    correct = labels[gold_rows] == gold
    searched = np.array([bool(records[i].get("icm_searched", True)) for i in gold_rows])
    rows = [("all claims with gold", len(gold_rows), _fmt(float(correct.mean()), share=True))]
    for name, mask in (("searched by ICM", searched), ("predicted from the searched", ~searched),
                       ("labelled True", labels[gold_rows]), ("labelled False", ~labels[gold_rows])):
        if mask.any():
            rows.append((name, int(mask.sum()), _fmt(float(correct[mask].mean()), share=True)))
    bins = calibration(s, gold)
    fig, ax = plt.subplots(figsize=(5.2, 4))
    ax.plot([0, 1], [0, 1], ls="--", color="#9aa5b1", lw=1)
    ax.plot([b[0] for b in bins], [b[1] for b in bins], marker="o", color="#2b6cb0")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="sigmoid(icm_score)", ylabel="share gold True",
           title="calibration (equal-count bins)")
    body = (f'<div class="row"><div>{table(rows, ["claims", "n", "accuracy against gold"])}'
            + table([[f"{p:.2f}", f"{o:.2f}", n] for p, o, n in bins], ["mean predicted P(True)", "gold True", "n"])
            + f"</div>{page.figure(fig, f'{prefix}calibration')}</div>")
    page.add(f"{prefix}calibration", f"{title}Accuracy and calibration against gold", body)


# -- a pairs file ----------------------------------------------------------------------------------------------


def unpaired_section(page: Page, report: dict[str, Any], prefix: str = "", title: str = "") -> None:
    """The summary of an ``icm pairs --format kto`` report (unpaired examples)."""
    balance, by_labels = report["label_balance"], report["questions_by_labels"]
    rows: list[tuple[str, Any]] = [("rows (candidates)", report["rows"]), ("questions", report["questions"]),
                                   ("labels True / False", f"{balance['true']} / {balance['false']}"),
                                   ("questions all True / all False / mixed",
                                    f"{by_labels['all_true']} / {by_labels['all_false']} / {by_labels['mixed']}"),
                                   ("examples (desirable / undesirable)",
                                    f"{report['examples']} ({report['desirable']} / {report['undesirable']})")]
    rows += [(f"rows dropped: {k}", v) for k, v in report["dropped"].items()]
    if report.get("labels_gold_accuracy") is not None:
        rows.append(("labels gold accuracy", _fmt(report["labels_gold_accuracy"], share=True)))
    for key, value in (report.get("quality") or {}).items():
        rows.append((key.replace("_", " "), value if key == "examples_with_gold" else _fmt(value, share=True)))
    for split, info in (report.get("splits") or {}).items():
        rows.append((f"split {split}: examples / questions", f"{info['examples']} / {info['questions']}"))
    page.add(f"{prefix}pairs", f"{title}Unpaired examples (kto)", table(rows))


def pairs_sections(page: Page, report_path: Path, prefix: str = "", title: str = "") -> None:
    """Summary of the pairs report, pairs per question and the margin distribution (by gold correctness)."""
    plt = _pyplot()
    if read_json(report_path, RERUN, keys=()).get("format") == "kto":
        return unpaired_section(page, read_json(report_path, RERUN, keys=("examples", "questions_by_labels")),
                                prefix, title)
    report = read_json(report_path, RERUN, keys=PAIRS_REPORT_KEYS)
    balance, ppq = report["label_balance"], report["pairs_per_question"]
    rows: list[tuple[str, Any]] = [("rows (candidates)", report["rows"]), ("questions", report["questions"]),
                                   ("labels True / False", f"{balance['true']} / {balance['false']}"),
                                   ("candidate pairs", report["candidate_pairs"]), ("pairs kept", report["pairs"]),
                                   ("questions with pairs", report["questions_with_pairs"]),
                                   ("pairs per question mean / min / max",
                                    f"{_fmt(ppq['mean'])} / {ppq['min']} / {ppq['max']}")]
    rows += [(f"questions skipped: {k}", v) for k, v in report["questions_skipped"].items()]
    rows += [(f"pairs dropped: {k}", v) for k, v in report["dropped"].items()]
    if report.get("labels_gold_accuracy") is not None:
        rows.append(("labels gold accuracy", _fmt(report["labels_gold_accuracy"], share=True)))
    for key, value in (report.get("quality") or {}).items():
        rows.append((key.replace("_", " "), value if key == "pairs_with_gold" else _fmt(value, share=True)))
    for split, info in (report.get("splits") or {}).items():
        rows.append((f"split {split}: pairs / questions", f"{info['pairs']} / {info['questions']}"))
    page.add(f"{prefix}pairs", f"{title}Pairs", table(rows))

    base = report_path.with_name(report_path.name.removesuffix(".report.json") + ".parquet")
    pairs = [p for path in split_paths(base).values() if path.suffix == ".parquet" and path.is_file()
             for p in read_records(path)]
    if not pairs:
        page.add(f"{prefix}margins", f"{title}Pairs per question and margins",
                 f"<p class='note'>No pairs file next to {html.escape(report_path.name)}; distributions not shown.</p>")
        return
    per_question = Counter(str(p["question_id"]) for p in pairs)
    histogram = Counter(per_question.values())
    histogram[0] += report["questions"] - len(per_question)
    xs = sorted(k for k, v in histogram.items() if v)
    note = ""
    if len(xs) > 1:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.6))
        bars = ax.bar([str(x) for x in xs], [histogram[x] for x in xs], color="#3b82f6")
        ax.bar_label(bars, fontsize=8)
        ax.set(xlabel="pairs of a question", ylabel="questions", title="pairs per question")
        _integer_axis(ax.yaxis)
    else:  # one bar says no more than a sentence
        fig, bx = plt.subplots(figsize=(6.5, 3.6))
        note = f"<p>Every question has {xs[0]} pair{'s' if xs[0] != 1 else ''}.</p>" if xs else ""
    margins = np.array([float(p["margin"]) for p in pairs])
    edges = np.histogram_bin_edges(margins, bins=24)
    if all(p.get("chosen_is_correct") is not None and p.get("rejected_is_correct") is not None for p in pairs):
        right = np.array([bool(p["chosen_is_correct"]) and not p["rejected_is_correct"] for p in pairs])
        inverted = np.array([bool(p["rejected_is_correct"]) and not p["chosen_is_correct"] for p in pairs])
        other = ~right & ~inverted
        groups = [(margins[m], c, n) for m, c, n in ((right, "#2f855a", "right (gold)"),
                                                      (inverted, "#c53030", "inverted (gold)"),
                                                      (other, "#9aa5b1", "both or neither right")) if m.any()]
        bx.hist([g[0] for g in groups], bins=edges, color=[g[1] for g in groups], label=[g[2] for g in groups],
                stacked=True)
        bx.legend(fontsize=8)
    else:
        bx.hist(margins, bins=edges, color="#3b82f6")
    bx.set(xlabel="margin (chosen icm_score - rejected icm_score)", ylabel="pairs", title="margin distribution")
    _integer_axis(bx.yaxis)
    page.add(f"{prefix}margins", f"{title}Pairs per question and margins",
             note + page.figure(fig, f"{prefix}margins"))
    example = pairs[0]
    page.add(f"{prefix}example-pair", f"{title}An example pair", _example([
        ("prompt", _text(example.get("prompt"))), ("chosen", _text(example.get("chosen"))),
        ("rejected", _text(example.get("rejected"))), ("margin", example.get("margin")),
        ("chosen really correct (gold)", example.get("chosen_is_correct")),
        ("rejected really correct (gold)", example.get("rejected_is_correct"))]))


# -- a transfer run --------------------------------------------------------------------------------------------


def transfer_sections(page: Page, run_dir: Path) -> None:
    """Held-out accuracy before and after, per arm with its CI, then the ICM arm's label run and pairs."""
    from icm.dpo.transfer import plot_transfer

    report = read_json(run_dir / "transfer.json", RERUN, keys=("mode", "labeller", "policy", "held_out",
                                                                 "accuracy_before", "config", "arms"))
    questions = report.get("questions") or {}
    rows = [("mode", report["mode"]), ("labeller", report["labeller"]), ("policy", report["policy"]),
            ("questions (train / held out)", f"{questions.get('train')} / {report['held_out']}"),
            ("held-out accuracy before", _fmt(report["accuracy_before"], share=True))]
    level = report["config"]["confidence"]
    arms = [[arm, _fmt(r["label_accuracy"], share=True), r["pairs"], _fmt(r["pair_accuracy"], share=True),
             _fmt(r["true_share"], share=True), _fmt(report["accuracy_before"], share=True),
             _fmt(r["accuracy_after"], share=True),
             f"{r['delta'] * 100:+.1f} [{r['delta_ci']['low'] * 100:+.1f}, {r['delta_ci']['high'] * 100:+.1f}]",
             r.get("note")] for arm, r in report["arms"].items()]
    header = ["arm", "label accuracy", "pairs", "pair accuracy", "True share of the arm's labels", "before", "after",
              f"change, points [{level:.0%} CI]", "note"]
    if not any(row[-1] for row in arms):
        arms, header = [row[:-1] for row in arms], header[:-1]
    path = page.output.with_name(f"{page.output.stem}-accuracy.png")
    plot_transfer(report, path)
    body = table(rows) + table(arms, header)
    page.add("accuracy", "Held-out accuracy before and after, per arm", body + page.image(path, "accuracy"))
    if (run_dir / "icm" / "run.json").is_file():
        label_sections(page, run_dir / "icm", prefix="icm-", title="ICM arm: ")
    if (run_dir / "pairs.report.json").is_file():
        pairs_sections(page, run_dir / "pairs.report.json", prefix="icm-", title="ICM arm: ")


def write_report(path: str | Path, output: str | Path | None = None) -> tuple[str, Path, list[Path]]:
    """Write the HTML page for the run at ``path`` (atomic); returns its kind, the page and the PNGs."""
    kind, target = detect(path)
    output = Path(output) if output else default_output(kind, target)
    if output.suffix.lower() not in (".html", ".htm"):
        raise InputError(output, "the report is an HTML page: give a path ending in .html")
    run_dir = target if target.is_dir() else target.parent
    check_output(output, target, *(p for d in (run_dir, run_dir / "icm") if d.is_dir() for p in d.iterdir()
                                   if p.suffix.lower() not in (".html", ".htm", ".png")))
    output.parent.mkdir(parents=True, exist_ok=True)
    page = Page(output)
    try:
        if kind == "transfer":
            transfer_sections(page, target)
        elif kind == "label":
            label_sections(page, target)
        else:
            pairs_sections(page, target)
    except InputError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:  # a value of the wrong shape
        raise InputError(target, f"damaged or of another icm version ({type(error).__name__}: {error}); "
                         f"{RERUN}") from None
    title = f"icm report: {TITLES[kind]}"
    with atomic_path(output) as tmp:
        tmp.write_text(scrub(page.render(title, str(target))), encoding="utf-8")
    return kind, output, page.images
