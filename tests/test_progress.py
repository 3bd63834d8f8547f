"""data/progress.py, and what every tool prints: a bar on a terminal, periodic key:value lines elsewhere; clean --help
pages; default outputs git ignores."""
import shutil
import subprocess
import sys

import pytest
from tqdm import tqdm

from conftest import REPO, selected, side_by_side
from data import progress as pg


def test_off_a_terminal_a_line_comes_every_period_even_inside_one_long_item(capsys):
    lines = pg.Lines(total=4, desc="sweep", unit="scoring")
    try:
        # A whole-second start a minute ahead: start + n is exact (from an arbitrary monotonic start, start + 25 - start
        # can round below 25 and miss its line), and the lines' own 1 s timer stays silent during the test.
        start = lines.start = lines.last = float(int(lines.start) + 60)
        lines.beat(start + pg.PROGRESS_SECONDS - 1)  # not yet
        assert capsys.readouterr().out == ""
        lines.update()
        lines.set_postfix_str("fetched_gb:0.40")
        lines.beat(start + pg.PROGRESS_SECONDS)
        lines.beat(start + pg.PROGRESS_SECONDS + 1)  # a period since the last line, not since the start
        lines.beat(start + 2 * pg.PROGRESS_SECONDS + 1)
    finally:
        lines.close()
    assert capsys.readouterr().out.splitlines() == [
        f"progress:sweep done:1/4 unit:scoring elapsed_s:{pg.PROGRESS_SECONDS} eta_s:{3 * pg.PROGRESS_SECONDS} "
        "fetched_gb:0.40",
        f"progress:sweep done:1/4 unit:scoring elapsed_s:{2 * pg.PROGRESS_SECONDS + 1} "
        f"eta_s:{3 * (2 * pg.PROGRESS_SECONDS + 1)} fetched_gb:0.40"]
    assert not lines.timer.is_alive()


def test_lines_count_what_they_wrap_and_say_only_what_they_know(capsys):
    wrapped = pg.Lines(iter("abc"), desc="reading", unit="doc")  # a stream: no total
    assert list(wrapped) == ["a", "b", "c"] and wrapped.n == 3 and not wrapped.timer.is_alive()
    assert wrapped.line(wrapped.start + 5) == "progress:reading done:3 unit:doc elapsed_s:5"
    with pg.Lines(desc="tokenizer_training") as single:  # one long call: only the time
        assert single.line(single.start + 30) == "progress:tokenizer_training elapsed_s:30"
    with pg.Lines([1, 2], desc="x") as sized:
        assert sized.total == 2


def test_a_terminal_gets_tqdms_bar(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = pg.progress(range(3), desc="tokenizing", unit="doc")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with pg.progress(range(3), desc="tokenizing") as lines:
        assert isinstance(lines, pg.Lines)
    assert not lines.timer.is_alive()


SCRIPTS = ["train_moe.py", "scripts/bench_step.py", "scripts/check_record.py", "scripts/export_hf.py",
           "scripts/export_sweep.py", "scripts/hf_layouts.py", "scripts/make_record.py", "scripts/router_dashboard.py",
           "scripts/sample.py", "scripts/study.py", "-m data.download", "-m data.prepare", "-m data.default_corpus"]


@pytest.fixture(scope="module")
def help_pages(request) -> dict:
    """`--help` of each script this session checks, their interpreters side by side."""
    def run(script):
        return subprocess.run([sys.executable, *script.split(), "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    return side_by_side(run, {s: (s,) for s in selected(request, "test_every_help_page_reads_cleanly", SCRIPTS, "script")})


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_help_page_reads_cleanly(help_pages, script):
    """Exit 0, nothing on stderr, and no line run together or stretched (a docstring's backslash continuation, an
    argparse choices list)."""
    result = help_pages[script]
    assert result.returncode == 0 and result.stderr == "" and result.stdout.strip()
    assert max(map(len, result.stdout.splitlines())) <= 120, max(result.stdout.splitlines(), key=len)


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("output", ["logs/x.txt", "artifacts/x.moe", "hf/quickstart/config.json", "dashboard.html",
                                    "dashboard_png/00_compare_loss.png", "data/datasets/default_sp1024/a.bin",
                                    "data/tokenizers/default_1024_bpe.model"])
def test_default_outputs_are_git_ignored(output):
    assert subprocess.run(["git", "check-ignore", "-q", output], cwd=REPO).returncode == 0
