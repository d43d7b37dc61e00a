"""Prefect artifact keys: one spelling for every flow's progress, link and table artifacts."""

from __future__ import annotations

import re


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from ``parts`` (keys allow lowercase letters, digits and dashes only)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
