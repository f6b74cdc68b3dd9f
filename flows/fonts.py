"""Every name prints: the characters of a document checked against the installed fonts.

WeasyPrint lays text out with Pango, which takes glyphs from fontconfig's fonts (the CSS stack
first, then any installed font that has the character). A character no installed font has is
drawn as an empty box; `billrun pdf` asks fontconfig (`fc-list :charset=...`) about each
character of the document first and refuses to write boxes.
"""
from __future__ import annotations

import shutil
import subprocess
import unicodedata
from functools import lru_cache
from html.parser import HTMLParser

from transforms.errors import InputError

FONT_PACKAGES = "fonts-dejavu-core fonts-noto-core fonts-noto-cjk"


class _Text(HTMLParser):
    """The text a reader sees: character data outside <style>, <script> and <title>."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("style", "script", "title"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("style", "script", "title") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def document_characters(html: str) -> set[str]:
    """The printable characters of a document's text (spaces and controls left out)."""
    parser = _Text()
    parser.feed(html)
    parser.close()
    return {ch for ch in "".join(parser.parts)
            if not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Zs", "Zl", "Zp")}


@lru_cache(maxsize=4096)
def _covered(charset: str) -> bool:
    """Whether one installed font has every character of `charset` (fontconfig hex list)."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        raise InputError("fontconfig's fc-list is not installed, so the fonts cannot be checked for "
                         f"missing glyphs (Debian: apt-get install fontconfig {FONT_PACKAGES})")
    found = subprocess.run([fc_list, f":charset={charset}", "family"], capture_output=True, text=True,
                           timeout=60, check=False)
    return bool(found.stdout.strip())


def missing_glyphs(chars: set[str]) -> list[str]:
    """The characters no installed font can draw, in code point order. One question to
    fontconfig when a single font covers them all (the usual case), else one per character."""
    ordered = sorted(chars)
    if not ordered or _covered(" ".join(f"{ord(ch):x}" for ch in ordered)):
        return []
    return [ch for ch in ordered if not _covered(f"{ord(ch):x}")]


def check_glyphs(html: str, document: str) -> None:
    """Refuse, in one line, a document with characters that would print as empty boxes."""
    missing = missing_glyphs(document_characters(html))
    if missing:
        shown = ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise InputError(f"{document}: no installed font has a glyph for {shown}{more}; the PDF would print "
                         f"empty boxes (install fonts that cover them, e.g. Debian: apt-get install {FONT_PACKAGES})")
