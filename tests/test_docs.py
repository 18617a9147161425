"""Every file, module and name the code and the docs refer to exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("taso", "baselines", "experiments", "analysis")
EXTERNAL = {"docs/papers.md"}  # the research note, which cites other repositories' files


def sources() -> list[Path]:
    top = [p for pattern in ("*.py", "*.md", "Makefile") for p in REPO.glob(pattern)]
    nested = [p for folder in (*PACKAGES, "conf", "docs", "tests") for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".md", ".yaml")]
    return sorted(top + nested)


SOURCES = sources()
# a path inside the repository (a doc, a module, a config file, a package folder)
PATH = re.compile(r"(?<![\w/.])((?:docs|conf|" + "|".join(PACKAGES) + r")/[\w/.-]*\w)(?![\w/$<{*(-]|\.\w)")
ROLE = re.compile(r":(?:mod|func|class|meth|data|attr):`~?((?:" + "|".join(PACKAGES) + r")\.[\w.]+)`")


def mentions(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    return [
        (source, found)
        for path in SOURCES
        if (source := str(path.relative_to(REPO))) not in EXTERNAL
        for found in pattern.findall(path.read_text(encoding="utf-8"))
    ]


def resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_sources_are_found() -> None:
    assert REPO / "taso" / "layer.py" in SOURCES and REPO / "README.md" in SOURCES


@pytest.mark.parametrize("source, path", sorted(set(mentions(PATH))))
def test_a_mentioned_path_exists(source: str, path: str) -> None:
    assert (REPO / path).exists(), f"{source} mentions {path}, which does not exist"


@pytest.mark.parametrize("source, name", sorted(set(mentions(ROLE))))
def test_a_docstring_reference_resolves(source: str, name: str) -> None:
    assert resolves(name), f"{source} refers to {name}, which does not exist"


def test_papers_md_is_cited_by_its_path_in_the_repository() -> None:
    bare = mentions(re.compile(r"^.*(?<!docs/)papers\.md.*$", re.M))
    assert not [(source, line) for source, line in bare if not source.startswith("docs/")]  # docs/ link it relatively


LINK = re.compile(r"\]\((?!https?:|#|mailto:)([^)#\s]+)")


@pytest.mark.parametrize("doc", [p for p in SOURCES if p.suffix == ".md" and str(p.relative_to(REPO)) not in EXTERNAL], ids=str)
def test_markdown_links_resolve(doc: Path) -> None:
    broken = [link for link in LINK.findall(doc.read_text(encoding="utf-8")) if not (doc.parent / link).exists()]
    assert not broken, f"{doc.relative_to(REPO)} links to missing {broken}"

