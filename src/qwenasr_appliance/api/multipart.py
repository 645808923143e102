"""multipart/form-data for the audio routes: parts of any shape give the audio or a 400, never a 500.

Litestar's own form parser takes a part without a filename for a text field and decodes it as UTF-8
(or its declared charset) inside the parser: the official OpenAI Python SDK sends `file=(None, data)`
that way, and binary data there raised `UnicodeDecodeError` (an unknown charset `LookupError`), a 500
whose repr carried the part's bytes into the log. `FormRequest` keeps Litestar's request and
validation (the `TranscriptionForm` struct, the OpenAPI document) and replaces only that parser, with
the same `multipart` package (RFC 7578) underneath:

* the `file` part is the upload whatever its headers say (no `filename`, `filename=""`, only
  `filename*` (RFC 5987), any content type, a nested `multipart/mixed`): the decoder judges the bytes;
  any other part with a filename is an upload too (and then fails validation, naming its field);
* `include` and `timestamp_granularities` are read with or without `[]` (or `[0]`, `[1]`...);
* part headers are read as Latin-1 (every byte sequence is valid), then names and filenames as UTF-8
  where they are; a filename is a hint only, its control characters dropped and its length capped;
* a text field in an unknown charset, or not valid in its charset, is a 400 naming the field;
* malformed framing is a 400 `invalid_request`, a form over the parser's limits a 413 `multipart_limit`.
"""

from __future__ import annotations

import codecs
import re
import urllib.parse
from collections import defaultdict
from collections.abc import AsyncGenerator
from typing import Any, Final

from litestar import Request
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.types import Empty
from multipart import (  # type: ignore[import-untyped]
    MultipartError,
    MultipartSegment,
    ParserLimitReached,
    PushMultipartParser,
)

from qwenasr_appliance.api.errors import APIError, bad_request, clip, multipart_limit

# The one file field of OpenAI's audio API.
FILE_FIELD: Final = "file"
MAX_FILENAME_CHARS: Final = 255
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# OpenAI's array fields; the SDKs send `include[]`, curl users type `include`, qs-style encoders
# `include[0]`: all three name the same field.
_ARRAY_FIELDS: Final = ("include", "timestamp_granularities")
_ARRAY_NAME = re.compile(r"^(include|timestamp_granularities)(?:\[\d*\])?$")
_EXTENDED_FILENAME = re.compile(r"""filename\*\s*=\s*("[^"]*"|[^;\s]*)""", re.IGNORECASE)


def _utf8(text: str) -> str:
    """A header value read as Latin-1, as UTF-8 where its bytes are (browsers send UTF-8 names)."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _filename(segment: MultipartSegment) -> str | None:
    """The part's filename (`filename`, else `filename*`), cleaned; None when it has neither."""
    name: str | None = segment.filename
    if not name:
        disposition = segment.header("Content-Disposition", "")
        extended = _EXTENDED_FILENAME.search(disposition)
        if extended:
            value = extended.group(1).strip('"')
            if value.count("'") >= 2:  # charset'language'percent-encoded (RFC 5987 section 3.2)
                charset, _, encoded = value.split("'", 2)
                try:
                    name = urllib.parse.unquote(encoded, encoding=charset or "utf-8", errors="replace")
                except LookupError:  # an unknown charset: UTF-8 is what clients send
                    name = urllib.parse.unquote(encoded, errors="replace")
            else:  # a bare value, as some clients send it
                name = value
        elif name is None:
            return None
    return _CONTROL.sub("", _utf8(name or ""))[:MAX_FILENAME_CHARS]


def field_name(name: str) -> str:
    """The form's name for a part: `include`, `include[]` and `include[0]` are all `include[]` (and the
    same for `timestamp_granularities`); other names as they are."""
    match = _ARRAY_NAME.match(name)
    return f"{match.group(1)}[]" if match else name


def _is_upload(segment: MultipartSegment, name: str) -> bool:
    if name == FILE_FIELD or segment.filename is not None:
        return True
    return bool(_EXTENDED_FILENAME.search(segment.header("Content-Disposition", "")))


def _text(segment: MultipartSegment, name: str, data: bytes) -> str:
    charset = segment.charset or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        raise bad_request(
            f"The form field {clip(name)!r} declares an unknown charset {clip(charset)!r}.", param=clip(name)
        ) from None
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, ValueError):
        raise bad_request(
            f"The form field {clip(name)!r} is not valid {clip(charset)} text; upload binary data as a file.",
            param=clip(name),
        ) from None


async def _close_all(fields: dict[str, list[Any]], current: UploadFile | None) -> None:
    uploads = [value for values in fields.values() for value in values if isinstance(value, UploadFile)]
    for upload in [*uploads, *([current] if current is not None else [])]:
        await upload.close()


async def parse_form_data(stream: AsyncGenerator[bytes, None], boundary: bytes, *, part_limit: int) -> dict[str, Any]:
    """The form as Litestar's parser returns it: {name: value, or a list of values when repeated}, text
    fields as `str`, uploads as `UploadFile` (spooled to a temporary file past 1 MiB).

    Raises `APIError`: 400 `invalid_request` for broken framing or boundary, 400 `invalid_value` for an
    undecodable text field, 413 `multipart_limit` past `part_limit` parts or the parser's header limits.
    """
    fields: defaultdict[str, list[Any]] = defaultdict(list)
    upload: UploadFile | None = None
    text = bytearray()
    segment: MultipartSegment | None = None
    name = ""
    try:
        chunk = await anext(stream, b"")
        if not chunk:
            return {}
        with PushMultipartParser(boundary, max_segment_count=part_limit, header_charset="latin-1") as parser:
            while not parser.closed:
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        segment, name, text = event, field_name(_utf8(event.name or "")), bytearray()
                        if _is_upload(event, name):
                            upload = UploadFile(
                                content_type=event.content_type or "application/octet-stream",
                                filename=_filename(event) or "",
                                headers={key: _CONTROL.sub("", value) for key, value in event.headerlist},
                            )
                    elif event:
                        if upload is not None:
                            await upload.write(event)
                        else:
                            text.extend(event)
                    else:  # the end of a part
                        if segment is None:
                            raise APIError(400, "Unexpected end of a multipart part.", code="invalid_request")
                        if upload is not None:
                            await upload.seek(0)
                            fields[name].append(upload)
                            upload = None
                        else:
                            fields[name].append(_text(segment, name, bytes(text)))
                        segment, text = None, bytearray()
                chunk = await anext(stream, b"")
    except ParserLimitReached:
        await _close_all(fields, upload)
        raise multipart_limit() from None
    except (MultipartError, ValueError):  # the framing, or a boundary the parser refuses
        await _close_all(fields, upload)
        raise APIError(400, "The multipart/form-data body is malformed.", code="invalid_request") from None
    except BaseException:
        await _close_all(fields, upload)
        raise
    return {key: values if len(values) > 1 else values[0] for key, values in fields.items()}


class FormRequest(Request[Any, Any, Any]):
    """Litestar's request with `parse_form_data` as its multipart parser (set as `request_class`)."""

    async def form(self) -> Any:
        content_type, options = self.content_type
        boundary = options.get("boundary")
        if (
            self._form is Empty
            and content_type == RequestEncodingType.MULTI_PART
            and boundary
            and self._connection_state.form is Empty
        ):
            self._connection_state.form = await parse_form_data(
                self.stream(), boundary.encode(), part_limit=self.app.multipart_form_part_limit
            )
        return await super().form()
