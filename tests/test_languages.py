"""Language names and codes: the model's list, resolution of what clients send, and the error."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from qwenasr_appliance.languages import (
    LANGUAGE_CODES,
    SUPPORTED_LANGUAGES,
    UnsupportedLanguageError,
    iso_code,
    resolve_language,
)


def _qwen_asr_supported_languages() -> list[str]:
    """qwen-asr's own list, read from its source (importing the package takes seconds)."""
    spec = importlib.util.find_spec("qwen_asr")
    if spec is None or spec.origin is None:
        pytest.skip("qwen-asr is not installed")
    source = (Path(spec.origin).parent / "inference" / "utils.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "SUPPORTED_LANGUAGES":
            assert node.value is not None
            return list(ast.literal_eval(node.value))
    raise AssertionError("SUPPORTED_LANGUAGES not found in qwen_asr/inference/utils.py")


def test_the_list_is_qwen_asrs_list_in_its_order() -> None:
    assert list(SUPPORTED_LANGUAGES) == _qwen_asr_supported_languages()
    assert len(SUPPORTED_LANGUAGES) == 30


def test_every_language_has_a_distinct_code() -> None:
    assert set(LANGUAGE_CODES) == set(SUPPORTED_LANGUAGES)
    assert len(set(LANGUAGE_CODES.values())) == len(SUPPORTED_LANGUAGES)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("en", "English"),
        ("EN", "English"),
        (" en ", "English"),
        ("english", "English"),
        ("ENGLISH", "English"),
        ("English", "English"),
        ("zh", "Chinese"),
        ("yue", "Cantonese"),
        ("cantonese", "Cantonese"),
        ("fil", "Filipino"),
        ("tl", "Filipino"),
        ("tagalog", "Filipino"),
        ("fa", "Persian"),
        ("farsi", "Persian"),
        ("mandarin", "Chinese"),
        ("el", "Greek"),
        ("mk", "Macedonian"),
        ("en-US", "English"),
        ("pt_BR", "Portuguese"),
        ("zh-Hans-CN", "Chinese"),
        ("zh-yue", "Cantonese"),
    ],
)
def test_resolve_language_accepts_codes_names_and_tags(value: str, expected: str) -> None:
    assert resolve_language(value) == expected


@pytest.mark.parametrize("value", ["", "   ", "xx", "klingon", "af", "uk", "Sichuanese", "en-", "-en"])
def test_resolve_language_rejects_what_the_model_does_not_support(value: str) -> None:
    with pytest.raises(UnsupportedLanguageError) as caught:
        resolve_language(value)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert repr(value) in message
    assert "English (en)" in message and "Cantonese (yue)" in message and "Macedonian (mk)" in message


def test_every_language_round_trips_through_its_code() -> None:
    for name in SUPPORTED_LANGUAGES:
        code = iso_code(name)
        assert code is not None
        assert resolve_language(code) == name
        assert resolve_language(name.upper()) == name


def test_iso_code() -> None:
    assert iso_code("English") == "en"
    assert iso_code("cantonese") == "yue"
    assert iso_code("Filipino") == "fil"
    assert iso_code("Klingon") is None
    assert iso_code("") is None
