"""Markdown that the strings put into it cannot break out of.

The model card puts strings from elsewhere into Markdown: the source model's name and path, its
config's `model_type` and quantisation method, a plan's method, the commands that made the
checkpoint. Markdown passes raw HTML through and gives meaning to much punctuation, so such a
string could open a `<script>`, a link, an image, a heading or a table cell, or close the code
block it sits in. Each one goes through one of these instead:

* `text`: inline text. `<`, `>` and `&` become entities (no tag, no entity of the string's own);
  the punctuation that starts emphasis, code, links, images, headings, table cells, strikethrough
  or maths gets a backslash (CommonMark shows a backslash-escaped ASCII punctuation character as
  itself). Line breaks and other control or format characters (bidi overrides included) are
  shown as their escape (`\\n`), so the string stays on its line and in its block.
* `code`: an inline code span, for names that read best as code; its backtick delimiter is longer
  than any run of backticks inside, and everything else in a code span is shown literally.
* `fence`: a fenced code block whose fence is longer than any run of backticks in the content,
  so no line of the content can close it. Line breaks are kept (a command may span lines).
"""

from __future__ import annotations

import re
import unicodedata

_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MARKUP = set("\\`*_{}[]()#!|~$")
_CONTROL = ("Cc", "Cf", "Zl", "Zp")
_BACKTICKS = re.compile("`+")


def _visible(value: object, keep: str = "") -> str:
    """`value` as a string whose control and format characters (except those in `keep`) are written as escapes."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in _CONTROL and ch not in keep else ch
        for ch in str(value)
    )


def _longest_backtick_run(value: str) -> int:
    return max((len(run) for run in _BACKTICKS.findall(value)), default=0)


def text(value: object) -> str:
    """`value` as inline Markdown text that shows exactly its characters and nothing else."""
    return "".join(_ENTITIES.get(ch) or ("\\" + ch if ch in _MARKUP else ch) for ch in _visible(value))


def code(value: object) -> str:
    """`value` as an inline code span that nothing inside can close."""
    content = _visible(value)
    if not content.strip():
        return text(content)
    delimiter = "`" * (_longest_backtick_run(content) + 1)
    # CommonMark strips one space from each end of a span that starts and ends with one: padding
    # keeps a backtick at an end from merging with the delimiter, and keeps edge spaces.
    pad = " " if content[0] in "` " or content[-1] in "` " else ""
    return f"{delimiter}{pad}{content}{pad}{delimiter}"


def fence(content: str, info: str = "") -> str:
    """`content` as a fenced code block (`info`: its language) that no line of it can close."""
    content = _visible(content, keep="\n\t")
    marker = "`" * max(3, _longest_backtick_run(content) + 1)
    return f"{marker}{info}\n{content}\n{marker}"
