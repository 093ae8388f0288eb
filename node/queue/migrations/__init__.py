"""Numbered schema migrations, one folder per backend: `NNNN_what.sql`, applied in order, each once, at start-up
under the database's lock, so two nodes starting together never race. A statement ends with `;` at the end of a
line. Never edit a released file: add the next number."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

FOLDER = Path(__file__).resolve().parent


class Migration(NamedTuple):
    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """The statements one by one (SQLite runs one per call inside a transaction)."""
        statements, lines = [], []
        for line in self.sql.splitlines():
            if line.lstrip().startswith("--"):
                continue
            lines.append(line)
            if line.rstrip().endswith(";"):
                statements.append("\n".join(lines).strip())
                lines = []
        if "\n".join(lines).strip():
            statements.append("\n".join(lines).strip())
        return statements


def migrations(backend: str) -> list[Migration]:
    """The migrations of `backend` ("sqlite" or "postgresql"), oldest first."""
    found = []
    for path in sorted((FOLDER / backend).glob("[0-9][0-9][0-9][0-9]_*.sql")):
        found.append(Migration(int(path.name[:4]), path.stem, path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{FOLDER / backend}: migrations must be numbered 0001, 0002, ... without gaps: {versions}")
    return found
