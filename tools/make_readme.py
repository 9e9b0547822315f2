"""Write README.md from nbs/index.ipynb, the one source of the front page (nbdev-readme needs quarto, which is not
installable offline). Markdown cells are copied as they are; code cells become ```python blocks unless they are
`#| hide`. `python tools/make_readme.py --check` exits 1 when README.md is out of date."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(index: Path = ROOT / "nbs" / "index.ipynb") -> str:
    parts = []
    for cell in json.loads(index.read_text())["cells"]:
        src = "".join(cell["source"]).strip()
        if not src or src.startswith("#| hide"): continue
        if cell["cell_type"] == "code":   # nbdev's directives (`#| export`) are for nbdev, not for the reader
            src = "\n".join(line for line in src.splitlines() if not line.startswith("#|")).strip()
        parts.append(src if cell["cell_type"] == "markdown" else f"```python\n{src}\n```")
    return ("<!-- Made from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n"
            + "\n\n".join(parts) + "\n")


if __name__ == "__main__":
    text, readme = render(), ROOT / "README.md"
    if "--check" in sys.argv[1:]:
        if readme.read_text() != text: sys.exit("README.md is out of date: run python tools/make_readme.py")
    else: readme.write_text(text)
