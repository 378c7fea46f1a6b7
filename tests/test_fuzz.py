"""The hostile-input fuzz campaign (issue 17), see tests/fuzz_cases.py: seeded byte- and structure-level
mutations of small valid models and nonsense options for every subcommand, each run in-process through
spa.cli.main and classified as ok / clean reject / verify reject / crash. The default suite runs 300 cases;
`pytest -m fuzz` runs 3,000 more (other seeds).

    .venv/bin/python -m pytest -q tests/test_fuzz.py                 # 300 cases
    .venv/bin/python -m pytest -q -m fuzz tests/test_fuzz.py         # 3,000 cases
    .venv/bin/python tests/fuzz_cases.py --case s0-123               # re-run one case
"""
from __future__ import annotations

from collections import Counter

import pytest
from fuzz_cases import campaign, generate, report

DEFAULT_CASES = 300
FUZZ_CASES = 3000

def check(outcomes) -> None:
    kinds = Counter(o.kind for o in outcomes)
    crashes = [o for o in outcomes if o.kind == "crash"]
    assert not crashes, "\n" + report(outcomes)
    assert kinds["ok"] and kinds["clean"], kinds   # the campaign reaches both outcomes (verify rejects are rare)
    print("\n" + report(outcomes))


def test_generator_is_seeded():
    a, b = generate(40, seed=0), generate(40, seed=0)
    assert [(c.argv, c.files) for c in a] == [(c.argv, c.files) for c in b]
    assert [c.argv for c in generate(40, seed=1)] != [c.argv for c in a]
    assert {c.family.split("-")[0] for c in generate(200, seed=0)} >= {"bytes", "structure", "options", "valid"}


def test_fuzz_campaign(tmp_path):
    check(campaign(DEFAULT_CASES, 0, tmp_path))


@pytest.mark.fuzz
@pytest.mark.parametrize("seed", range(1, 11))
def test_fuzz_campaign_large(tmp_path, seed):
    check(campaign(FUZZ_CASES // 10, seed, tmp_path))
