"""The README's API tour runs as written, on shapes shrunk to keep the test quick."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
# (the tour's shapes, smaller ones with the same channels and features)
SMALLER = {
    "(32, 64, 56, 56)": "(4, 64, 3, 3)",
    "(32, 56, 56)": "(4, 3, 3)",
    "(8, 128, 768)": "(2, 4, 768)",
}


def test_the_api_tour_runs():
    tour = re.search(r"## API tour\n\n```python\n(.*?)```", README.read_text(), re.DOTALL)
    code = tour.group(1)
    for shape, smaller in SMALLER.items():
        assert shape in code, f"the tour no longer uses {shape}: update SMALLER"
        code = code.replace(shape, smaller)
    exec(compile(code, "README.md (API tour)", "exec"), {})
