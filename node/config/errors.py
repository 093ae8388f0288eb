"""What is wrong with the settings: a :class:`Problem` per bad value, all of them in one :class:`ConfigError`.

Every problem names where the value came from (the file, the environment variable, the override), the key path
(``peers[1].port``, ``routing.rules[0].destinations``), what is wrong and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["ConfigError", "Problem"]


class Problem(NamedTuple):
    """One thing wrong with the settings."""

    source: str  # where the value came from: the file path, "environment CXRNODE_X__Y", "override x.y", "defaults"
    key: str  # the key path, e.g. "peers[1].port"; "" when the problem is with the source as a whole
    message: str  # what is wrong and what is allowed

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}" if self.key else f"{self.source}: {self.message}"


class ConfigError(ValueError):
    """The settings are unusable. ``str(error)`` has one line per problem: ``SOURCE: KEY: what is wrong``.

    A ``ValueError``, so ``parse_address`` can serve directly as an argparse ``type=``.
    """

    def __init__(self, problems: Sequence[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("settings", "", problems)]
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
