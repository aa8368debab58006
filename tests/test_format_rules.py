"""layouts/FORMAT.md's refusal rules [Rn] and the tests: each rule is exercised by a test that names
it (the tag, in brackets, in its case id, docstring or comment), and no test names a rule the spec lacks."""

from __future__ import annotations

import re
from pathlib import Path

import flashmoe.layouts

FORMAT = Path(flashmoe.layouts.__file__).parent / "FORMAT.md"
TESTS = Path(__file__).parent


def test_every_rule_of_the_spec_has_a_test():
    spec = set(re.findall(r"\*\*\[(R\d+)\]\*\*", FORMAT.read_text()))
    tested = set()
    for path in TESTS.glob("test_*.py"):
        tested |= set(re.findall(r"\[(R\d+)\]", path.read_text()))
    assert len(spec) >= 20
    assert not spec - tested, f"FORMAT.md rules without a test: {sorted(spec - tested)}"
    assert not tested - spec, f"tests name rules FORMAT.md lacks: {sorted(tested - spec)}"
