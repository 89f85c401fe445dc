"""Print the README's code block marked ``<!-- ci: NAME -->`` (install, wheel, quickstart), for CI to run as written.

Usage: ``python3 .ci/readme.py NAME``.  A missing marker or a marker without a fenced block right after it fails.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def block(name: str, text: str) -> str:
    match = re.search(rf"<!-- ci: {re.escape(name)} -->\n```[a-z]*\n(.*?)\n```", text, re.S)
    if match is None:
        raise SystemExit(f"README.md has no fenced code block right after <!-- ci: {name} -->")
    return match.group(1) + "\n"


if __name__ == "__main__":
    sys.stdout.write(block(sys.argv[1], README.read_text()))
