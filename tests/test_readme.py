"""The README stays true: its segment table is the one the code uses."""

from pathlib import Path

from latencytrace.node_agent import segments

README = Path(__file__).resolve().parents[1] / "README.md"


def test_segment_table_matches_the_code():
    text = README.read_text()
    table = text.split("<!-- segments:begin -->", 1)[1].split("<!-- segments:end -->", 1)[0]
    assert table.strip() == segments.markdown().strip(), "README segments out of date: paste segments.markdown()"


def test_every_ci_command_the_readme_names_exists():
    text = README.read_text()
    root = README.parent
    for cmd in ("setup", "test", "demo", "cluster", "bench", "run"):
        assert f".ci/{cmd}" in text
        assert (root / ".ci" / cmd).stat().st_mode & 0o111, cmd
