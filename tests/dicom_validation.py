"""Validate DICOM files with dicom3tools' `dciodvfy` (David Clunie's IOD verifier).

`dciodvfy FILE` checks a file against its IOD (modules, attribute types, conditions, enumerated values, VRs) and prints
one line per finding, "Error - ..." or "Warning - ...". Tests that use `assert_valid_dicom` are skipped where
dciodvfy is not installed (`make tools` installs it).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

DCIODVFY = "dciodvfy"


def dciodvfy_available() -> bool:
    return shutil.which(DCIODVFY) is not None


def dciodvfy_report(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(errors, warnings): dciodvfy's "Error - " and "Warning - " lines for the file at `path`, prefixes removed."""
    if not dciodvfy_available():
        raise FileNotFoundError(f"{DCIODVFY} is not installed (it is part of dicom3tools).")
    completed = subprocess.run(
        [DCIODVFY, os.fspath(path)], capture_output=True, text=True, errors="replace", timeout=60, check=False
    )
    errors: list[str] = []
    warnings: list[str] = []
    for line in (completed.stdout + completed.stderr).splitlines():
        line = line.strip()
        if line.startswith("Error - "):
            errors.append(line.removeprefix("Error - "))
        elif line.startswith("Warning - "):
            warnings.append(line.removeprefix("Warning - "))
    return errors, warnings


def assert_valid_dicom(path: str | os.PathLike[str], *, allowed_warnings: tuple[str, ...] = ()) -> list[str]:
    """Fail the test, listing dciodvfy's errors, unless the file has none; skip it when dciodvfy is missing.

    With `allowed_warnings`, a warning that contains none of those substrings fails the test too. Returns the
    warnings.
    """
    if not dciodvfy_available():
        pytest.skip(f"{DCIODVFY} (dicom3tools) is not installed")
    errors, warnings = dciodvfy_report(path)
    if errors:
        pytest.fail(f"dciodvfy found {len(errors)} error(s) in {os.fspath(path)}:\n" + "\n".join(errors))
    if allowed_warnings:
        unexpected = [w for w in warnings if not any(allowed in w for allowed in allowed_warnings)]
        if unexpected:
            pytest.fail(
                f"dciodvfy found {len(unexpected)} unexpected warning(s) in {os.fspath(path)}:\n"
                + "\n".join(unexpected)
            )
    return warnings
