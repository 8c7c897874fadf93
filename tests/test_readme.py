"""The README stays true: its segment table is the one the code uses, every command file it names
exists, and every claim it marks as tested names a test that exists."""

import ast
import re
from pathlib import Path

from latencytrace.node_agent import segments

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The documents whose "(tested: ...)" claims must name their tests.
CLAIMING = (README, ROOT / "operator" / "README.md")
TESTED = re.compile(r"\(tested\b([^)]*)\)")
NAMED = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def test_segment_table_matches_the_code():
    text = README.read_text()
    table = text.split("<!-- segments:begin -->", 1)[1].split("<!-- segments:end -->", 1)[0]
    assert table.strip() == segments.markdown().strip(), "README segments out of date: paste segments.markdown()"


def test_every_ci_command_the_readme_names_exists():
    named = set(re.findall(r"\.ci/([\w-]+)", README.read_text()))
    assert {"setup", "test", "demo", "cluster", "bench", "run"} <= named, named  # the ones the table promises
    for cmd in sorted(named):
        path = ROOT / ".ci" / cmd
        assert path.is_file() and path.stat().st_mode & 0o111, f"README names .ci/{cmd}, which is not an executable"


def test_every_tested_claim_names_tests_that_exist():
    claims = [c for doc in CLAIMING for c in TESTED.findall(doc.read_text())]
    assert len(claims) >= len(CLAIMING), "a document lost its (tested: ...) claims: has its wording changed?"
    for detail in claims:
        names = NAMED.findall(detail)
        assert names and detail.startswith(":"), f"(tested{detail}) does not name its test as (tested: path::name)"
        for path, name in names:
            source = ROOT / path
            assert source.is_file(), f"(tested: {path}::{name}): no such file"
            defined = {n.name for n in ast.walk(ast.parse(source.read_text()))
                       if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
            assert name in defined and name.startswith("test_"), f"(tested: {path}::{name}): no such test"
