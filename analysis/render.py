"""A :class:`~analysis.cells.ScoreTable` as Markdown, LaTeX (booktabs) and CSV; the best
cell of each column is bold in Markdown and LaTeX."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.cells import ScoreTable

LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "—": "---", "†": r"$^\dagger$",
}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def embolden(text: pd.DataFrame, bold: pd.DataFrame, template: str) -> pd.DataFrame:
    """``text`` with ``template`` (e.g. ``**{}**``) applied where ``bold`` is True."""
    return text.where(~bold, text.map(template.format))


def to_markdown(table: ScoreTable) -> str:
    return "\n\n".join([embolden(table.text, table.bold, "**{}**").to_markdown(), *table.notes])


def to_latex(table: ScoreTable) -> str:
    body = embolden(table.text.map(latex_escape), table.bold, r"\textbf{{{}}}")
    body = body.reset_index()
    body.columns = body.columns.map(latex_escape)
    body.iloc[:, 0] = body.iloc[:, 0].map(latex_escape)
    latex = body.to_latex(index=False, escape=False, column_format="l" + "r" * (body.shape[1] - 1))
    return latex + "".join(f"% {note}\n" for note in table.notes)


def to_csv(table: ScoreTable) -> str:
    return table.text.to_csv()


def write_table(table: ScoreTable, stem: Path) -> list[Path]:
    """``<stem>.md``, ``<stem>.csv`` and ``<stem>.tex``; returns their paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, render in ((".md", to_markdown), (".csv", to_csv), (".tex", to_latex)):
        path = stem.with_suffix(suffix)
        path.write_text(render(table).rstrip("\n") + "\n", encoding="utf-8")
        written.append(path)
    return written
