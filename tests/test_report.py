"""icm report: one self-contained HTML page for a label run, a pairs file and a transfer run (tiny model).

The transfer report is checked on the run ``test_transfer.py`` makes anyway (:func:`check_transfer_report`)."""

from __future__ import annotations

import base64
import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from icm.cli import app
from icm.dpo.report import calibration, detect, rolling_acceptance

runner = CliRunner()


@pytest.fixture(scope="module")
def label_run(tiny_model_dir, tmp_path_factory):
    """labels.parquet with its run dir labels.run/, and pairs.parquet with pairs.report.json, from claims with gold."""
    root = tmp_path_factory.mktemp("report")
    rows = [{"question": f"What is {q} + 2?", "choice": f"The answer is {q + 2 + d}.", "consistency_id": q,
             "answer": str(q + 2 + d), "label": d == 0} for q in range(6) for d in (0, 1, 3)]
    (root / "claims.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for argv in (["label", str(root / "claims.jsonl"), "-o", str(root / "labels.parquet"), "--model", tiny_model_dir,
                  "--dtype", "fp32", "--iterations", "12"],
                 ["pairs", str(root / "labels.parquet"), "-o", str(root / "pairs.parquet")]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
    return root


def sections(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', page)


def check_self_contained(page: str, pngs: list) -> None:
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), refs
    assert "<script" not in page and "url(" not in page and "<link" not in page
    inlined = [base64.b64decode(r.split(",", 1)[1]) for r in refs if r.startswith("data:")]
    assert inlined == [p.read_bytes() for p in pngs]  # every plot is inlined, and written next to the page
    assert all(b[:8] == b"\x89PNG\r\n\x1a\n" for b in inlined)


def report(path, *extra) -> str:
    result = runner.invoke(app, ["report", str(path), *extra])
    assert result.exit_code == 0, result.output
    return result.output


def check_transfer_report(transfer_run, tmp_path) -> None:
    """Called by test_transfer.py on its finished run (a transfer run is the slowest thing to make)."""
    out = tmp_path / "page.html"
    assert "transfer report" in report(transfer_run, "--output", str(out))
    page = out.read_text()
    assert sections(page) == ["accuracy", "icm-summary", "icm-quality", "icm-search", "icm-labels", "icm-example",
                              "icm-calibration", "icm-pairs", "icm-margins", "icm-example-pair"]
    pngs = sorted(tmp_path.glob("page-*.png"), key=lambda p: page.index(f'alt="{p.stem.removeprefix("page-")}"'))
    assert [p.stem for p in pngs] == ["page-accuracy", "page-icm-search", "page-icm-labels", "page-icm-calibration",
                                      "page-icm-margins"]
    check_self_contained(page, pngs)
    transfer = json.loads((transfer_run / "transfer.json").read_text())
    for arm, entry in transfer["arms"].items():  # one row per arm, with its CI of the change in points
        ci = entry["delta_ci"]
        assert f"<td>{arm}</td>" in page
        assert f"{entry['delta'] * 100:+.1f} [{ci['low'] * 100:+.1f}, {ci['high'] * 100:+.1f}]" in page


def test_label_report_shows_search_acceptance_and_gold(label_run, tmp_path):
    run_dir = tmp_path / "icm"
    shutil.copytree(label_run / "labels.run", run_dir)
    shutil.copy(label_run / "labels.parquet", tmp_path / "labels.parquet")
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(run | {"output": "elsewhere/labels.parquet"}))  # found by name
    report(run_dir)
    page = (run_dir / "report.html").read_text()
    assert sections(page) == ["summary", "quality", "search", "labels", "example", "calibration"]
    example = page.split('<section id="example">')[1].split("</section>")[0]
    assert "<th>claim</th>" in example and "<th>gold label</th>" in example and "What is 0 + 2?" in example
    quality = run["quality"]  # the label-quality estimate, shown as measured
    assert f"<td>{quality['low_margin']['share']:.1%}</td>" in page and "- (one restart)" in page
    assert f"<td>{quality['surface']['majority_share']:.1%}</td>" in page
    assert any(o >= 0 for batch in run["outcomes"] for o in batch)  # the search recorded its steps
    assert len(run["outcomes"][0]) == len(run["trajectories"][0]) - 1
    assert "not recorded" not in page and "not found" not in page
    assert f"<td>{run['claims']}</td>" in page
    check_self_contained(page, [run_dir / f"report-{n}.png" for n in ("search", "labels", "calibration")])
    (tmp_path / "labels.parquet").unlink()  # without the labels file: the search is still shown, and why not the rest
    report(run_dir / "run.json")
    page = (run_dir / "report.html").read_text()
    assert sections(page) == ["summary", "quality", "search", "labels"] and "was not found" in page


def test_a_labels_file_finds_its_run_directory(label_run, tmp_path):
    assert detect(label_run / "labels.parquet") == ("label", label_run / "labels.run")
    out = tmp_path / "labels.html"
    assert "label report" in report(label_run / "labels.parquet", "--output", str(out))
    assert sections(out.read_text())[:3] == ["summary", "quality", "search"]


def test_pairs_report_from_the_file_or_its_directory(label_run, tmp_path):
    for name in ("pairs.parquet", "pairs.report.json"):
        shutil.copy(label_run / name, tmp_path / name)
    for target in (tmp_path / "pairs.parquet", tmp_path / "pairs.report.json", tmp_path):
        assert detect(target) == ("pairs", tmp_path / "pairs.report.json")
    report(tmp_path)
    page = (tmp_path / "pairs.report.html").read_text()
    assert sections(page) == ["pairs", "margins", "example-pair"]
    example = page.split('<section id="example-pair">')[1].split("</section>")[0]
    assert "<th>chosen</th>" in example and "<th>rejected</th>" in example and "The answer is" in example
    pairs = json.loads((tmp_path / "pairs.report.json").read_text())
    assert f"<td>{pairs['pairs']}</td>" in page
    check_self_contained(page, [tmp_path / "pairs.report-margins.png"])


def test_kto_pairs_report_shows_the_unpaired_examples(label_run, tmp_path):
    result = runner.invoke(app, ["pairs", str(label_run / "labels.parquet"), "-o", str(tmp_path / "kto.parquet"),
                                 "--format", "kto"])
    assert result.exit_code == 0, result.output
    report(tmp_path / "kto.parquet")
    page = (tmp_path / "kto.report.html").read_text()
    assert sections(page) == ["pairs"] and "Unpaired examples (kto)" in page
    kto = json.loads((tmp_path / "kto.report.json").read_text())
    assert kto["examples"] == 18 and f"{kto['examples']} ({kto['desirable']} / {kto['undesirable']})" in page


def test_not_a_run_is_a_one_line_error(tmp_path):
    (tmp_path / "candidates.report.json").write_text(json.dumps({"claims": 3}))  # a report, but not of pairs
    for target in (tmp_path, tmp_path / "candidates.report.json", tmp_path / "missing"):
        result = runner.invoke(app, ["report", str(target)])
        assert result.exit_code == 2
        assert len(result.output.strip().splitlines()) == 1 and "error:" in result.output
    assert "not a label run directory" in runner.invoke(app, ["report", str(tmp_path)]).output
    assert not list(tmp_path.glob("*.html"))


def test_rolling_acceptance_and_calibration():
    steps, rates = rolling_acceptance([1, -1, 0, 1, 0], window=2)
    assert steps == [1, 3, 4, 5] and rates == [1.0, 0.5, 0.5, 0.5]
    bins = calibration(np.array([-3.0, -2.0, 2.0, 3.0]), np.array([False, True, True, True]), bins=2)
    assert [(round(p, 3), o, n) for p, o, n in bins] == [(0.083, 0.5, 2), (0.917, 1.0, 2)]
