"""The languages a caller may force, by the names Qwen3-ASR writes and reads in `language X<asr_text>`.

Source: `SUPPORTED_LANGUAGES` of the `qwen-asr` package 0.0.6 (`qwen_asr/inference/utils.py`), the list its
`transcribe(language=...)` validates against: 30 languages, Cantonese included. Left out on purpose:

- vLLM 0.26's Qwen3-ASR model reuses Whisper's generic ISO 639-1 table (`whisper_utils.py`, the languages
  of OpenAI's speech-to-text docs). It is not the model's list: it lacks Cantonese and names 30-odd
  languages Qwen3-ASR was not trained on, so forcing them would only prompt the model with an unknown name.
- The 22 Chinese dialects of the model card (Sichuanese, Wu, Minnan...) are recognised but reported as
  "Chinese" (or "Cantonese"); they are not names the model accepts after `language `.
- A checkpoint's `support_languages` in config.json is informational (the released ones list the same
  languages); the package never reads it for validation, so neither do we.

Codes are ISO 639-1 where one exists, else ISO 639-3 (`yue` for Cantonese, `fil` for Filipino).
"""

from __future__ import annotations

import re
from types import MappingProxyType

# Canonical name -> primary code, in qwen-asr's order.
_PRIMARY_CODES: dict[str, str] = {
    "Chinese": "zh",
    "English": "en",
    "Cantonese": "yue",
    "Arabic": "ar",
    "German": "de",
    "French": "fr",
    "Spanish": "es",
    "Portuguese": "pt",
    "Indonesian": "id",
    "Italian": "it",
    "Korean": "ko",
    "Russian": "ru",
    "Thai": "th",
    "Vietnamese": "vi",
    "Japanese": "ja",
    "Turkish": "tr",
    "Hindi": "hi",
    "Malay": "ms",
    "Dutch": "nl",
    "Swedish": "sv",
    "Danish": "da",
    "Finnish": "fi",
    "Polish": "pl",
    "Czech": "cs",
    "Filipino": "fil",
    "Persian": "fa",
    "Greek": "el",
    "Romanian": "ro",
    "Hungarian": "hu",
    "Macedonian": "mk",
}

# Other spellings clients send: ISO 639-1 / 639-3 codes of the same language and common names.
_ALIASES: dict[str, str] = {
    "tl": "Filipino",
    "tagalog": "Filipino",
    "cmn": "Chinese",
    "mandarin": "Chinese",
    "farsi": "Persian",
    "zh-yue": "Cantonese",
}

SUPPORTED_LANGUAGES: tuple[str, ...] = tuple(_PRIMARY_CODES)
LANGUAGE_CODES = MappingProxyType(dict(_PRIMARY_CODES))  # canonical name -> primary code

_LOOKUP: dict[str, str] = {
    **{name.lower(): name for name in _PRIMARY_CODES},
    **{code: name for name, code in _PRIMARY_CODES.items()},
    **_ALIASES,
}
_REGION_SUFFIX = re.compile(r"[-_][a-z0-9]+$")


class UnsupportedLanguageError(ValueError):
    """The value names no language the model supports; the message lists the supported ones."""

    def __init__(self, value: str) -> None:
        listed = ", ".join(f"{name} ({code})" for name, code in _PRIMARY_CODES.items())
        shown = value if len(value) <= 64 else value[:64] + "..."
        super().__init__(f"unsupported language {shown!r}; supported: {listed}")
        self.value = value


def resolve_language(value: str) -> str:
    """The canonical name for an ISO code or a name, case-insensitive ("EN", "english", "en-US" -> "English")."""
    key = value.strip().lower()
    name = _LOOKUP.get(key)
    if name is None:
        # A BCP 47 tag ("pt-BR", "zh_Hans") names its language first.
        base = _REGION_SUFFIX.sub("", key)
        while base != key and name is None:
            name = _LOOKUP.get(base)
            key, base = base, _REGION_SUFFIX.sub("", base)
    if name is None:
        raise UnsupportedLanguageError(value)
    return name


def iso_code(name: str) -> str | None:
    """The primary code of a language ("English" -> "en", "cantonese" -> "yue"); None if it is not supported."""
    try:
        return _PRIMARY_CODES[resolve_language(name)]
    except UnsupportedLanguageError:
        return None
