"""The links of a chained Ogg file (RFC 3533 section 4: logical bitstreams one after another).

`cat a.ogg b.ogg` is a valid Ogg file of two links. FFmpeg's Ogg demuxer reads the first link and
fails at the second when its stream parameters change (channels, sample rate): the rest was dropped and
the answer was a 200 for half the audio. The decoder instead decodes each link on its own; this module
only finds where each link starts, from the page headers, without decoding anything.
"""

from __future__ import annotations

import struct
from typing import Final

_CAPTURE: Final = b"OggS"
_HEADER: Final = struct.Struct("<4sBBqIIIB")  # capture, version, type, granule, serial, sequence, CRC, segments
_BEGINNING_OF_STREAM: Final = 0x02
# The most links decoded separately; a file of more is decoded as FFmpeg reads it (links cost a
# container each, and no real recording has this many).
MAX_LINKS: Final = 64


def ogg_links(data: bytes) -> list[bytes]:
    """The links of an Ogg file in order, as separate byte strings (views are not needed: links are
    decoded one at a time). A file of one link, not Ogg, or with damaged page framing before a second
    link is found, is returned whole as its only link. A link starts at a beginning-of-stream page that
    follows a page that is not one (a link's own streams all begin on its first pages)."""
    if not data.startswith(_CAPTURE):
        return [data]
    starts = [0]
    offset = 0
    previous_began = False
    while offset + _HEADER.size <= len(data) and len(starts) <= MAX_LINKS:
        capture, version, header_type, _, _, _, _, segments = _HEADER.unpack_from(data, offset)
        if capture != _CAPTURE or version != 0:
            break  # damaged framing: the rest stays with the current link
        table_end = offset + _HEADER.size + segments
        if table_end > len(data):
            break
        began = bool(header_type & _BEGINNING_OF_STREAM)
        if began and not previous_began and offset > 0:
            starts.append(offset)
        previous_began = began
        offset = table_end + sum(data[offset + _HEADER.size : table_end])
    if len(starts) == 1 or len(starts) > MAX_LINKS:
        return [data]
    ends = [*starts[1:], len(data)]
    return [data[start:end] for start, end in zip(starts, ends, strict=True)]
