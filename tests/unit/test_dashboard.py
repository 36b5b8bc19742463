"""`python tools/bench/run.py --dashboard OUT/`: a small matrix rendered for real (toy, f32,
TP1, paged and fused; one gfx942 compile), its page read back with html.parser and held
against its JSON, the logs it links to, an injected failure, and a self-contained page."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "tools" / "bench" / "run.py"
sys.path.insert(0, str(ROOT / "tools" / "bench"))


class CellParser(HTMLParser):
    """{row id: {column: {"status", "value", "note", "href"}}} from the matrix table."""

    def __init__(self):
        super().__init__()
        self.rows: dict = {}
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self._row = self._cell = self._span = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "href" in a:
            self.hrefs.append(a["href"])
        if "src" in a:
            self.srcs.append(a["src"])
        if tag == "tr" and "data-row" in a:
            self._row = self.rows.setdefault(a["data-row"], {})
        elif tag == "td" and self._row is not None and "data-col" in a:
            self._cell = self._row.setdefault(a["data-col"], {"status": "", "value": "",
                                                              "note": "", "href": None})
        elif tag == "span" and self._cell is not None:
            self._span = a.get("class")
        elif tag == "a" and self._cell is not None:
            self._cell["href"] = a.get("href")

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None
        elif tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._cell is not None and self._span in ("status", "value", "note"):
            self._cell[self._span] += data


def dashboard(out: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUN), "--dashboard", str(out), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("dash") / "out"
    proc = dashboard(out, "--models", "toy", "--dtypes", "f32", "--tp", "1", "--attention",
                     "paged,fused", "--quick",
                     "--cell-extra", "toy-f32-tp1-fused=--no-such-option")
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = (out / "index.html").read_text()
    data = json.loads((out / "dashboard.json").read_text())
    parser = CellParser()
    parser.feed(html)
    return out, html, data, parser


def test_html_cells_equal_the_json(rendered):
    _, _, data, parser = rendered
    assert [r["id"] for r in data["rows"]] == ["toy-f32-tp1-paged", "toy-f32-tp1-fused"]
    assert set(parser.rows) == {r["id"] for r in data["rows"]}
    for row in data["rows"]:
        assert set(parser.rows[row["id"]]) == set(data["columns"])
        for col, cell in row["cells"].items():
            shown = parser.rows[row["id"]][col]
            assert (shown["status"], shown["value"], shown["note"], shown["href"]) == \
                (cell["status"], cell["value"], cell["note"], cell["log"]), (row["id"], col)
            assert cell["status"] in ("pass", "fail", "not run", "n/a")


def test_every_log_link_exists(rendered):
    out, _, data, parser = rendered
    logs = [c["log"] for r in data["rows"] for c in r["cells"].values() if c["log"]]
    assert len(logs) >= 5  # paged: emit, gfx942, run, numeric; fused: emit
    for href in parser.hrefs:
        assert (out / href).is_file(), href
        assert (out / href).resolve().is_relative_to(out.resolve())
    assert set(logs) <= set(parser.hrefs)


def test_the_passing_row_ran_every_stage(rendered):
    out, _, data, _ = rendered
    cells = data["rows"][0]["cells"]
    assert [cells[c]["status"] for c in ("emit", "gfx942", "run", "numeric")] == ["pass"] * 4
    assert re.search(r"^wrote \S+\.vmfb in [0-9.]+ s$", (out / cells["gfx942"]["log"]).read_text(),
                     re.M)
    # The numeric cell is a real comparison with transformers: its number within the bound.
    log = (out / cells["numeric"]["log"]).read_text()
    kv = dict(x.split("=") for x in log.split("ok=1 ", 1)[1].split()[:3])
    assert float(kv["max_err"]) <= float(kv["bound"]) == 1e-3
    assert f"{float(kv['max_err']):.3g}" in cells["numeric"]["value"]
    assert cells["serving"]["status"] == "n/a"


def test_injected_failure_shows_as_fail(rendered):
    out, _, data, parser = rendered
    cells = data["rows"][1]["cells"]
    assert cells["emit"]["status"] == "fail"
    assert "--no-such-option" in cells["emit"]["note"]
    assert parser.rows["toy-f32-tp1-fused"]["emit"]["status"] == "fail"
    assert "--no-such-option" in (out / cells["emit"]["log"]).read_text()
    # --quick compiles only the first row; the failed row's later stages did not run.
    assert all(cells[c]["status"] == "not run" for c in ("gfx942", "run", "numeric"))


def test_page_is_self_contained(rendered):
    _, html, _, parser = rendered
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and not parser.srcs
    assert "<link" not in html  # inline CSS only
    assert html.count("<svg") >= 2  # the recorded plots render from BENCHMARKS.md


def test_bad_options_are_one_error_line_and_write_nothing(tmp_path):
    for args in (["--models", "nosuch"], ["--tp", "3"], ["--models", "toy", "--layers", "9"],
                 ["--models", "toy", "--cell-extra", "toy-f16-tp9-paged=--x"]):
        out = tmp_path / "out"
        proc = dashboard(out, *args)
        assert proc.returncode == 1, args
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert not out.exists()


def test_markdown_tables_and_shortfin_lookup(tmp_path, monkeypatch):
    import dashboard

    text = ("## A\n\n| x | y |\n|---|---|\n| 1 | > 20 (stopped) |\n\ntext\n\n| z |\n|---|\n"
            "| 3 |\n### A.1\n| w |\n|---|\n| 4 |\n## B\n| q |\n|---|\n| 5 |\n")
    assert dashboard.md_tables(text, "## A") == [[["x", "y"], ["1", "> 20 (stopped)"]],
                                                 [["z"], ["3"]], [["w"], ["4"]]]
    assert dashboard.md_tables(text, "### A.1") == [[["w"], ["4"]]]
    assert dashboard.md_tables(text, "## C") == []
    assert dashboard._num("> 20 (stopped)") == 20.0
    monkeypatch.setenv("HALO_SHORTFIN_PYTHON", str(tmp_path / "missing" / "python"))
    assert dashboard.shortfin_python() is None
