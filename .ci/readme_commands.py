"""Print the commands of the README's first code block, one per line, comments stripped.

`.ci/run` runs exactly these, so CI follows the README when its commands change.
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands(text: str) -> list[str]:
    block = re.search(r"^```[a-z]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    if block is None:
        raise ValueError("README.md has no code block")
    lines = (line.split("#", 1)[0].strip() for line in block.group(1).splitlines())
    return [line for line in lines if line]


if __name__ == "__main__":
    print("\n".join(readme_commands(README.read_text())))
    sys.exit(0)
