"""`python train_moe.py --help`: every setting the trainer reads, its default on this machine and its meaning from
docs/configuration.md. Here, not in the trainer, because a run does not need it."""
import re
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_moe as tm  # noqa: E402


def setting_defaults() -> dict[str, str]:
    """Every setting Hyperparameters reads, in order, with its default on this machine."""
    defaults = {}

    class Recorder(dict):  # an empty environment noting each env.get
        def get(self, name, default=None):
            return defaults.setdefault(name, default)

    tm.Hyperparameters(Recorder())
    return defaults


def setting_meanings(table: str) -> dict[str, tuple[str, str]]:
    """{NAME: (default, meaning)} from the rows of docs/configuration.md's settings table."""
    rows = re.findall(r"^\| (`[A-Z][^|]*) \| (.*?) \| (.*) \|$", table, re.M)
    return {name: (default, meaning) for names, default, meaning in rows for name in re.findall(r"`([A-Z0-9_]+)`", names)}


def settings_help() -> str:
    docs = REPO / "docs" / "configuration.md"
    meanings = setting_meanings(docs.read_text(encoding="utf-8")) if docs.is_file() else {}
    lines = [tm.__doc__.strip(), "", "Settings, NAME=default on this machine" + ("" if meanings else
             " (their meanings: docs/configuration.md of the moe-golf repository)") + ":"]
    for name, default in setting_defaults().items():
        doc_default, meaning = meanings.get(name, ("", ""))
        text = f"  {name}={default or f'({doc_default or None})'}  " + meaning.replace("\\|", "|").replace("`", "")
        lines.append(textwrap.fill(text, 118, subsequent_indent="      ", break_on_hyphens=False))
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_help())
