"""Docs cite what exists: each citation of docs/algorithms.md resolves, and none points outside the repo."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ALGORITHMS = REPO / "docs" / "algorithms.md"

HEADING = re.compile(r"^#{2,3} (?:(?P<number>\d+(?:\.\d+)?)\.? )?(?P<title>.+?)\s*$", re.MULTILINE)
# "docs/algorithms.md §5", "docs/algorithms.md §5 and §6.2", possibly across a docstring's line break
SECTION_CITATION = re.compile(r"docs/algorithms\.md\s+(§[\d.]*\d(?:(?:,\s*|\s+and\s+)§[\d.]*\d)*)")
TITLE_CITATION = re.compile(r'docs/algorithms\.md\s+"([^"]+)"')
SECTION_NUMBER = re.compile(r"§(\d+(?:\.\d+)?)")
# Citations a reader cannot follow inside the repository.
UNRESOLVABLE = re.compile(r"\.\./shared|shared algorithms reference|the algorithms doc\b", re.IGNORECASE)
REGISTERED_ESTIMATOR = re.compile(
    r"^\s*@(?:register_advantage|ADVANTAGE_ESTIMATORS\.register)\(\s*[\"']([^\"']+)[\"']", re.MULTILINE
)
REGISTERED_POLICY_LOSS = re.compile(r"^\s*@register_policy_loss\(\s*[\"']([^\"']+)[\"']", re.MULTILINE)


def _headings() -> tuple[list[str], set[str]]:
    """Section numbers (in the order of the page) and heading titles of docs/algorithms.md."""
    matches = list(HEADING.finditer(ALGORITHMS.read_text()))
    return [m["number"] for m in matches if m["number"]], {m["title"] for m in matches}


def _sources() -> list[Path]:
    """Every file a user or a contributor reads: the package, the docs, the README."""
    return sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def test_algorithms_doc_has_numbered_sections_in_order():
    numbers, titles = _headings()
    top_level = [int(n) for n in numbers if "." not in n]
    assert top_level == list(range(1, len(top_level) + 1)) and len(top_level) >= 10
    assert len(set(numbers)) == len(numbers), f"a section number is used twice: {numbers}"
    assert "Offline preference losses" in titles  # the heading the preference-loss table is merged under
    for number in numbers:
        assert number.split(".")[0] in numbers, f"subsection {number} has no parent section"


def test_every_citation_of_the_algorithms_doc_resolves():
    numbers, titles = _headings()
    broken = []
    for path in _sources():
        text = path.read_text()
        where = path.relative_to(REPO)
        for citation in SECTION_CITATION.finditer(text):
            for number in SECTION_NUMBER.findall(citation[1]):
                if number not in numbers:
                    broken.append(f"{where}:{_line_of(text, citation.start())} cites §{number}")
        for citation in TITLE_CITATION.finditer(text):
            if citation[1] not in titles:
                broken.append(f'{where}:{_line_of(text, citation.start())} cites "{citation[1]}"')
    # The doc's own cross-references ("see §6.2").
    text = ALGORITHMS.read_text()
    for reference in SECTION_NUMBER.finditer(text):
        if reference[1] not in numbers:
            line = _line_of(text, reference.start())
            broken.append(f"docs/algorithms.md:{line} refers to §{reference[1]}")
    assert not broken, "citations of sections that docs/algorithms.md does not have:\n" + "\n".join(broken)


def test_no_citation_points_outside_the_repository():
    """Users never see the internal reference; an informal "the algorithms doc" names no section to open."""
    found = []
    for path in _sources():
        text = path.read_text()
        for match in UNRESOLVABLE.finditer(text):
            found.append(f"{path.relative_to(REPO)}:{_line_of(text, match.start())}: {match[0]!r}")
    assert not found, "cite docs/algorithms.md §N instead of:\n" + "\n".join(found)


def test_every_registered_advantage_estimator_is_documented():
    text = ALGORITHMS.read_text()
    sources = (REPO / "src").rglob("*.py")
    names = {name for path in sources for name in REGISTERED_ESTIMATOR.findall(path.read_text())}
    assert {"gae", "gvm", "reinforce", "rloo"} <= names, f"the registrations were not found: {names}"
    undocumented = sorted(name for name in names if f"`{name}`" not in text)
    assert not undocumented, f"advantage estimators missing from docs/algorithms.md: {undocumented}"


def test_every_registered_policy_loss_is_documented():
    text = ALGORITHMS.read_text()
    names = {
        name
        for path in (REPO / "src").rglob("*.py")
        for name in REGISTERED_POLICY_LOSS.findall(path.read_text())
    }
    assert {"ppo", "gspo", "gspo_token", "cispo"} <= names, f"the registrations were not found: {names}"
    undocumented = sorted(name for name in names if f"`{name}`" not in text)
    assert not undocumented, f"policy losses missing from docs/algorithms.md: {undocumented}"


def test_every_command_of_the_real_models_section_is_run_by_the_real_model_tests():
    from tests.e2e.test_real_recipes import POLICIES, QUESTION, REAL

    section = (REPO / "README.md").read_text().split("## Real models", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    run = {"dvpo models fetch smollm2-135m-instruct"}
    run |= {f"dvpo fit --config configs/{name}.yaml" for name in REAL}
    run |= {f'dvpo generate outputs/{name}/model --prompt "{QUESTION}" --greedy' for name in POLICIES}
    assert commands and set(commands) <= run, set(commands) - run
    assert {f"dvpo fit --config configs/{name}.yaml" for name in REAL} <= set(commands)
