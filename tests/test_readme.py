"""The README stays true: the files it names exist, and the `./dev` verbs it shows exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
_PATH = re.compile(r"`\.?/?((?:[\w.-]+/)+[\w.*-]+\.(?:ya?ml|md|json|py|sh|toml|txt))`")


def test_every_file_the_readme_names_exists() -> None:
    named = {match.group(1) for match in _PATH.finditer(README)}
    assert "helm/qwenasr-appliance/ci/full-values.yaml" in named
    missing = sorted(path for path in named if "*" not in path and not (REPO / path).exists())
    assert not missing, f"the README names files that are not in the repository: {missing}"


def test_every_dev_verb_the_readme_shows_exists() -> None:
    script = (REPO / "dev").read_text()
    verbs = set(re.findall(r"\./dev (\w+)", README))
    assert {"serve", "test", "cli", "run"} <= verbs
    for verb in verbs:
        assert re.search(rf"^  {verb}\)$", script, re.MULTILINE), f"./dev has no verb {verb!r}"
