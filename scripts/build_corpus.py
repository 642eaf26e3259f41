#!/usr/bin/env python3
"""Build the three-domain plain-text corpus used to train and evaluate the reference MoE models.

Why three domains: expert-compression methods are judged partly by whether they keep the experts
that a *domain* needs, so the reference models must see clearly different kinds of text:

* ``pydoc``      - Python 3.11 documentation (reStructuredText sources from Debian ``python3.11-doc``),
* ``dictionary`` - GCIDE English dictionary entries (Debian ``dict-gcide``), one entry per document,
* ``manpages``   - Linux man-pages (Debian ``manpages`` and ``manpages-dev``), rendered with groff.

Every source document (a .rst file, a dictionary block, a man page) has a stable id. Its split
(train / calib / valid / test) is a pure function of that id (SHA-256 bucket), so the splits never
overlap and are reproducible on any machine with the same Debian package versions. Long source
documents are cut into paragraph-aligned chunks (<= ``MAX_CHARS``); all chunks of a source share its
split, so nothing leaks from train into evaluation.

Outputs: full splits in ``build/corpus/<domain>/<split>.jsonl`` and size-capped copies of the
calib/valid/test splits in ``src/moe_compress/assets/data/<domain>/`` (prefixes of the full files,
cut at whole documents), plus the assets README with sources, licenses and split sizes.

Usage: ``python scripts/build_corpus.py [--out build/corpus] [--assets src/moe_compress/assets/data]``
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("pydoc", "dictionary", "manpages")
SPLITS = ("train", "calib", "valid", "test")
N_BUCKETS = 30  # bucket 27 -> calib, 28 -> valid, 29 -> test, rest -> train (90 / 3.33 / 3.33 / 3.33 %)
EVAL_BUCKETS = {27: "calib", 28: "valid", 29: "test"}
MAX_CHARS = 4000  # chunk size: long enough for 256-token windows, short enough to mix sources
MIN_CHARS = {"pydoc": 200, "dictionary": 24, "manpages": 200}  # drop near-empty documents
ASSET_CAP_BYTES = 300_000  # per committed jsonl file; keeps assets/data around 2.7 MB

PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
PACKAGES = {"pydoc": ["python3.11-doc"], "dictionary": ["dict-gcide"], "manpages": ["manpages", "manpages-dev"]}
TOOLS = ["groff-base"]  # provides groff, tbl and preconv used to render man pages


@dataclass(frozen=True)
class Doc:
    """One output document: ``source`` decides the split, ``id`` is unique (``source#chunk``)."""

    id: str
    source: str
    domain: str
    text: str


# --------------------------------------------------------------------------- sources / apt


def _pkg_version(pkg: str) -> str | None:
    """Installed Debian version of ``pkg`` or None; recorded in the README for reproducibility."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}|${Version}", pkg], capture_output=True, text=True)
    if r.returncode != 0 or "install ok installed" not in r.stdout:
        return None
    return r.stdout.split("|", 1)[1]


def ensure_packages() -> dict[str, str]:
    """Install the Debian source packages when missing, so a fresh machine can rebuild the corpus."""
    wanted = [p for ps in PACKAGES.values() for p in ps] + TOOLS
    missing = [p for p in wanted if _pkg_version(p) is None]
    if missing:
        print(f"installing {missing} with apt-get", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        if subprocess.run(sudo + ["apt-get", "install", "-y", *missing], env=env).returncode != 0:
            subprocess.run(sudo + ["apt-get", "update"], env=env, check=True)
            subprocess.run(sudo + ["apt-get", "install", "-y", *missing], env=env, check=True)
    return {p: _pkg_version(p) or "?" for p in wanted}


# --------------------------------------------------------------------------- text helpers


def normalise(text: str) -> str:
    """Tabs to spaces, strip trailing space, at most one blank line, no blank edges, NFC unicode."""
    text = unicodedata.normalize("NFC", text).replace("\r", "").expandtabs(8)
    text = "".join(ch for ch in text if ch == "\n" or unicodedata.category(ch)[0] != "C")
    lines = [ln.rstrip() for ln in text.split("\n")]
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return out.strip("\n")


def chunk(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Cut at blank lines into pieces <= max_chars (a longer paragraph is cut at line ends)."""
    pieces: list[str] = []
    for para in text.split("\n\n"):
        if len(para) <= max_chars:
            pieces.append(para)
            continue
        cur: list[str] = []
        for line in para.split("\n"):
            if cur and sum(len(x) + 1 for x in cur) + len(line) > max_chars:
                pieces.append("\n".join(cur))
                cur = []
            cur.append(line[:max_chars])
        pieces.append("\n".join(cur))
    chunks: list[str] = []
    cur_len, cur = 0, []
    for p in pieces:
        if cur and cur_len + len(p) + 2 > max_chars:
            chunks.append("\n\n".join(cur))
            cur, cur_len = [], 0
        cur.append(p)
        cur_len += len(p) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


def make_docs(domain: str, source: str, text: str, max_chars: int = MAX_CHARS) -> list[Doc]:
    """Normalise, chunk and filter one source document."""
    text = normalise(text)
    parts = [c.strip("\n") for c in chunk(text, max_chars)] if len(text) > max_chars else [text]
    parts = [p for p in parts if len(p) >= MIN_CHARS[domain]]
    if len(parts) == 1:
        return [Doc(source, source, domain, parts[0])]
    return [Doc(f"{source}#{i:03d}", source, domain, p) for i, p in enumerate(parts)]


def _hash(salt: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big")


def split_of(source: str) -> str:
    """Split of a source document: a fixed function of its id, independent of everything else."""
    return EVAL_BUCKETS.get(_hash("moe-compress-split-v1", source) % N_BUCKETS, "train")


def order_key(doc: Doc) -> tuple[int, str]:
    """Pseudo-random but fixed order (sources shuffled, chunks of a source kept together)."""
    return (_hash("moe-compress-order-v1", doc.source), doc.id)


# --------------------------------------------------------------------------- pydoc (rst)

_DROP_WITH_BODY = {
    "toctree", "index", "testsetup", "testcleanup", "raw", "include", "literalinclude", "image",
    "figure", "tabularcolumns", "highlight", "highlightlang", "sectionauthor", "moduleauthor",
    "module", "currentmodule", "program", "audit-event", "audit-event-table", "namespace",
    "default-domain", "contents", "rst-class", "cssclass", "productionlist", "limited-api-list",
}
_LABELS = {
    "note": "Note:", "warning": "Warning:", "seealso": "See also:", "tip": "Tip:", "important": "Important:",
    "caution": "Caution:", "attention": "Attention:", "hint": "Hint:", "impl-detail": "CPython implementation detail:",
    "admonition": "", "topic": "", "rubric": "", "centered": "", "versionadded": "New in version",
    "versionchanged": "Changed in version", "deprecated": "Deprecated since version",
    "deprecated-removed": "Deprecated since version",
}
_LITERAL = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "parsed-literal"}
_PROSE_BODY = {"only", "container", "csv-table", "table", "list-table", "glossary", "hlist", "epigraph",
               "highlights", "pull-quote", "compound", "line-block", "versionadded", "math"}
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_ROLE = re.compile(r":((?:[\w-]+:)*[\w.+-]+):`([^`]+)`")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")
_TABLE_RULE = re.compile(r"^\s*[+=\-| ]*[=\-]{3,}[+=\-| ]*$")


def _role_text(m: re.Match[str]) -> str:
    """:func:`~os.path.join` -> join, :ref:`text <label>` -> text, :pep:`8` -> PEP 8."""
    role, inner = m.group(1), m.group(2)
    if role in {"pep", "rfc"}:
        return f"{role.upper()} {inner.split('#')[0]}"
    explicit = re.match(r"^(.*?)\s*<[^<>]+>$", inner, re.S)
    if explicit and explicit.group(1):
        return explicit.group(1)
    inner = inner.lstrip("!")
    if inner.startswith("~"):
        inner = inner[1:].split(".")[-1]
    return inner


def _rst_inline(text: str) -> str:
    """Strip inline markup from a prose paragraph (may span lines; never applied to literal blocks).

    ````literal```` spans are kept verbatim (minus the backticks); elsewhere roles, links, emphasis,
    footnote references, substitutions and backslash escapes are removed.
    """
    parts = re.split(r"``(.+?)``(?!`)", text, flags=re.S)
    for i in range(0, len(parts), 2):
        t = _ROLE.sub(_role_text, parts[i])
        t = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", t)
        t = re.sub(r"`([^`]+)`_{0,2}", r"\1", t)
        t = re.sub(r"\*\*(\S(?:[^*]*?\S)?)\*\*", r"\1", t)
        t = re.sub(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])", r"\1", t)
        t = re.sub(r"\s?\[(?:#\w*|\d+|\*)\]_", "", t)
        t = re.sub(r"\|(\w[\w -]*)\|_?", r"\1", t)
        parts[i] = re.sub(r"\\(.)", lambda m: "" if m.group(1) == " " else m.group(1), t)
    return "".join(parts)


def clean_rst(src: str) -> str:
    """Turn a Sphinx reStructuredText source into readable plain text.

    Line-based state machine: directives become their argument (e.g. a function signature) or a label
    such as ``Note:``; bookkeeping directives (toctree, index, ...) and comments are dropped with their
    body; heading underlines and table rules disappear; literal blocks (after ``::`` or code
    directives) are kept verbatim; runs of prose lines lose roles and inline markup as a paragraph, so
    markup that wraps across lines is handled too.
    """
    out: list[tuple[bool, str]] = []  # (is_prose, line)
    skip_indent: int | None = None  # dropping the body of a directive/comment indented deeper than this
    literal_indent: int | None = None  # inside a literal block indented deeper than this
    pending_literal: int | None = None  # previous prose ended with '::' at this indent
    in_options = False  # directive option lines (':key: value') directly after a directive
    for line in src.replace("\t", "        ").split("\n"):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if literal_indent is not None:
            if not stripped or indent > literal_indent:
                out.append((False, line))
                continue
            literal_indent = None
        if pending_literal is not None and stripped:
            if indent > pending_literal:
                literal_indent, pending_literal = pending_literal, None
                out.append((False, line))
                continue
            pending_literal = None
        if in_options:
            if re.match(r"^:[\w-]+:", stripped):
                continue
            in_options = False
        m = _DIRECTIVE.match(line)
        if m:
            name, arg, pad = m.group(2).split(":")[-1], m.group(3), " " * indent
            in_options = True
            if name in _DROP_WITH_BODY:
                skip_indent = indent
            elif name in _LITERAL:
                literal_indent = indent
            elif name in _LABELS:
                text = f"{_LABELS[name]} {arg}".strip()
                out.append((True, pad + text + ("." if name.startswith(("version", "deprec")) else "")))
            elif name in _PROSE_BODY:
                if arg and "table" in name:
                    out.append((True, pad + arg))
            else:  # object descriptions: function, class, method, data, opcode, c:function, describe, ...
                out.append((True, pad + arg.replace("\\", "")))
            continue
        if stripped.startswith(".. ") or stripped == "..":
            fn = re.match(r"^\.\.\s+\[[^\]]+\]\s*(.*)$", stripped)
            if fn:  # footnote: keep its text
                out.append((True, " " * indent + fn.group(1)))
            else:  # comment, hyperlink target, substitution definition
                skip_indent = indent
            continue
        if _UNDERLINE.match(line) or (_TABLE_RULE.match(line) and ("=" in stripped or "+" in stripped)):
            continue
        if stripped == "::":
            pending_literal = indent
            continue
        if stripped.endswith("::"):
            pending_literal = indent
            body = line[:-2].rstrip()
            line = body if not body or body.endswith((" ", ":")) or line[-3] == " " else body + ":"
        out.append((bool(stripped), line))
    # inline markup is removed per run of consecutive prose lines (a paragraph)
    result: list[str] = []
    run: list[str] = []
    for is_prose, line in out + [(False, "")]:
        if is_prose:
            run.append(line)
            continue
        if run:
            result.append(_rst_inline("\n".join(run)))
            run = []
        result.append(line)
    return "\n".join(result[:-1])


def iter_pydoc() -> Iterator[Doc]:
    """One source per .rst file, id ``pydoc/<path without .rst.txt>``."""
    for path in sorted(PYDOC_DIR.rglob("*.rst.txt")):
        rel = path.relative_to(PYDOC_DIR).as_posix()[: -len(".rst.txt")]
        yield from make_docs("pydoc", f"pydoc/{rel}", clean_rst(path.read_text(encoding="utf-8", errors="replace")))


# --------------------------------------------------------------------------- dictionary (GCIDE)

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_MARKS = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "=": "\u0304", "~": "\u0303", ".": "\u0307",
          ",": "\u0327", "^": "\u0302"}
_SPECIAL = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "th": "þ", "deg": "°", "sect": "§",
            "imac": "ī", "aum": "ä", "add": "ä", "udd": "ü", "asl": "a", "oo": "oo", "=oo": "o͞o", "oo^": "o͝o",
            "ng": "ŋ", "root": "√", "yogh": "ȝ", "=ae": "ǣ", "frac12": "½", "frac14": "¼", "frac34": "¾",
            "frac13": "⅓", "frac23": "⅔", "cre": "˘", "hand": "☞", "prime": "′", "dprime": "″", "lsquo": "‘",
            "rsquo": "’", "ldquo": "“", "rdquo": "”", "flat": "♭", "sharp": "♯", "natural": "♮",
            "times": "×", "divide": "÷", "pound": "£", "cent": "¢", "para": "¶", "dagger": "†"}
_ATTRIB = re.compile(
    r"\s*\[(?:(?:1913 Webster|Webster 1913 Suppl\.|WordNet[^\]+]*|PJC\.?|Century Dict\.[^\]+]*|RDH|AS|JS|DH|"
    r"MW\d*|NRCD|CS|JW|f|Chambers 1727)\s*\+?\s*)+\]"
)
_CODE = re.compile(r"\[([^\[\]\s]{1,7})\]")


def _b64(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64.index(c)
    return v


def _gcide_char(m: re.Match[str]) -> str:
    """GCIDE ASCII accent codes: ['e] -> é, [=a] -> ā, [a^] -> ă, [ae] -> æ; other brackets untouched."""
    code = m.group(1)
    if code in _SPECIAL:
        return _SPECIAL[code]
    if len(code) == 2 and code[0] in _MARKS and code[1].isalpha():
        return unicodedata.normalize("NFC", code[1] + _MARKS[code[0]])
    if len(code) == 2 and code[1] == "^" and code[0].isalpha():
        return unicodedata.normalize("NFC", code[0] + "\u0306")  # breve (short vowel)
    if len(code) == 2 and code[0] == "-" and code[1].isalpha():
        return code[1]
    if len(code) == 2 and code[0] == "*" and code[1].isalpha():
        return code[1]
    return m.group(0)


def clean_gcide(block: str) -> str:
    """Turn one dictd block into ``headword: definition`` text.

    Drops the syllabified pronunciation ``\\Ab*an"don\\`` (and a following parenthesised phonetic
    spelling), source attributions such as ``[1913 Webster]``, cross-reference braces, and joins the
    hard-wrapped lines of each paragraph.
    """
    block = _ATTRIB.sub("", block)
    paras: list[str] = []
    for para in re.split(r"\n\s*\n", block):
        lines = para.split("\n")
        for i, line in enumerate(lines):
            hm = re.match(r"^(\S[^\\\n]*?)\s+\\[^\\]*\\(.*)$", line)
            if hm and (i == 0 or not line.startswith(" ")):
                rest = re.sub(r"^\s*\([^).]*\)", "", hm.group(2))  # phonetic respelling, not '(Bot.)'
                lines[i] = f"{hm.group(1)}: {rest.lstrip(', ').strip()}"
        text = " ".join(x.strip() for x in lines if x.strip())
        if text:
            paras.append(text)
    text = "\n".join(paras)
    text = _CODE.sub(_gcide_char, text)
    text = re.sub(r"[{}]", "", text)
    text = re.sub(r"\s+--\s*(?=[A-Z])", " --", text)
    return re.sub(r"[ \u00a0]{2,}", " ", text).strip()


def iter_dictionary() -> Iterator[Doc]:
    """One source per distinct dictd block (many index words point to one block), id by byte offset."""
    data = gzip.open(GCIDE_DICT).read()
    blocks: set[tuple[int, int]] = set()
    for line in GCIDE_INDEX.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and not parts[0].startswith("00-database"):
            blocks.add((_b64(parts[1]), _b64(parts[2])))
    for off, size in sorted(blocks):
        raw = data[off : off + size]
        try:
            block = raw.decode("utf-8")
        except UnicodeDecodeError:  # a handful of blocks carry cp1252 bytes
            block = raw.decode("cp1252", errors="replace")
        text = clean_gcide(block)
        if ":" in text.split("\n", 1)[0]:
            yield from make_docs("dictionary", f"dictionary/{off:08d}", text)


# --------------------------------------------------------------------------- man pages


def _man_files() -> list[Path]:
    """Real (non-symlink, non-``.so`` stub) pages of sections 1-8 shipped by the man-pages packages."""
    listing = subprocess.run(["dpkg", "-L", *PACKAGES["manpages"]], capture_output=True, text=True, check=True)
    files: list[Path] = []
    for name in sorted(set(listing.stdout.split())):
        p = Path(name)
        if not re.search(r"^/usr/share/man/man[1-8]/", name) or p.is_symlink() or not p.is_file():
            continue
        head = gzip.open(p).read(400) if name.endswith(".gz") else p.read_bytes()[:400]
        if re.match(rb"^(?:\.\\\".*\n)*\.so ", head) or head.startswith(b".so "):
            continue
        files.append(p)
    return files


# Prepended to every page: pages that say ``.ad``/``.hy`` get left adjustment / no hyphenation anyway.
_MAN_PRELUDE = r".rn ad moe*ad\n.de ad\n.moe*ad l\n..\n.rn hy moe*hy\n.de hy\n..\n.nh\n.ad l\n"


def render_man(path: Path) -> str:
    """Render a page to 80-column text, left-adjusted and without hyphenation (see ``_MAN_PRELUDE``).

    Ragged-right text has no justification spaces and no split words, so it reads like the other
    domains. The first and last lines (``open(2)  System Calls Manual  open(2)`` header and
    ``Linux man-pages`` footer) are dropped, the 7-column body indent is removed and two spaces after
    a sentence become one (other runs of spaces are alignment in tables and code, and are kept).
    """
    cmd = f"(printf '{_MAN_PRELUDE}'; zcat -f '{path}') | preconv | tbl | groff -Tutf8 -man -rLL=80n -rHY=0 -P-cbou"
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, env=dict(os.environ, LC_ALL="C.UTF-8"))
    lines = r.stdout.decode("utf-8", errors="replace").split("\n")
    nonblank = [i for i, ln in enumerate(lines) if ln.strip()]
    if len(nonblank) < 3:
        return ""
    body = lines[nonblank[0] + 1 : nonblank[-1]]
    out = []
    for ln in body:
        ind = len(ln) - len(ln.lstrip(" "))
        ln = ln[min(ind, 7) :]
        out.append(re.sub(r"(?<=[a-z0-9)][.?!])  (?=[A-Z(])", " ", ln))
    return "\n".join(out)


def iter_manpages() -> Iterator[Doc]:
    """One source per man page, id ``manpages/man<N>/<page>``; rendering runs two groffs at a time."""
    files = _man_files()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for path, text in zip(files, pool.map(render_man, files)):
            page = path.name[:-3] if path.name.endswith(".gz") else path.name
            yield from make_docs("manpages", f"manpages/{path.parent.name}/{page}", text)


# --------------------------------------------------------------------------- writing

ITERATORS: dict[str, Callable[[], Iterable[Doc]]] = {
    "pydoc": iter_pydoc, "dictionary": iter_dictionary, "manpages": iter_manpages,
}


def write_jsonl(path: Path, docs: Iterable[Doc], cap_bytes: int | None = None) -> tuple[int, int]:
    """Write docs in order; with a cap, stop before the first document that would exceed it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = chars = size = 0
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            line = json.dumps({"id": d.id, "domain": d.domain, "text": d.text}, ensure_ascii=False) + "\n"
            size += len(line.encode())
            if cap_bytes is not None and size > cap_bytes:
                break
            f.write(line)
            n += 1
            chars += len(d.text)
    return n, chars


def build(out: Path, assets: Path) -> dict[str, dict[str, dict[str, int]]]:
    """Build all domains; returns stats[domain][split] = {docs, sources, chars, asset_docs, asset_chars}."""
    stats: dict[str, dict[str, dict[str, int]]] = {}
    for domain in DOMAINS:
        by_split: dict[str, list[Doc]] = {s: [] for s in SPLITS}
        for doc in ITERATORS[domain]():
            by_split[split_of(doc.source)].append(doc)
        stats[domain] = {}
        for split, docs in by_split.items():
            docs.sort(key=order_key)
            n, chars = write_jsonl(out / domain / f"{split}.jsonl", docs)
            st = {"docs": n, "sources": len({d.source for d in docs}), "chars": chars}
            if split != "train":
                st["asset_docs"], st["asset_chars"] = write_jsonl(
                    assets / domain / f"{split}.jsonl", docs, ASSET_CAP_BYTES
                )
            stats[domain][split] = st
        print(domain, {s: (v["docs"], v["chars"]) for s, v in stats[domain].items()}, flush=True)
    return stats


README = """# Corpus assets (calib / valid / test samples)

Small, committed copies of the evaluation splits of the three-domain corpus the reference models
(`assets/models/ref-*`) were trained on. Generated by `scripts/build_corpus.py`; do not edit by hand.

Format: JSON Lines, one document per line: `{{"id": ..., "domain": ..., "text": ...}}` (UTF-8 plain text).

## Sources and licenses

| domain | content | Debian package (version) | license |
|---|---|---|---|
| `pydoc` | Python 3.11 documentation, reStructuredText sources (`{pydoc_dir}`), markup stripped | `python3.11-doc` ({v_pydoc}) | PSF License Version 2 (see `/usr/share/doc/python3.11-doc/copyright`) |
| `dictionary` | GCIDE, the Collaborative International Dictionary of English 0.48 (`{gcide}`), one entry block per document, as `headword: definition` | `dict-gcide` ({v_gcide}) | GPL-2+ ("version 2, or (at your option) any later version", as stated in the data and `/usr/share/doc/dict-gcide/copyright`) |
| `manpages` | Linux man-pages 6.03, sections 1-8, rendered to text with groff | `manpages` ({v_man}), `manpages-dev` ({v_mandev}) | various free licenses, per page: Linux-man-pages-copyleft, GPL-1+/2/2+, BSD-2/3/4-clause, Expat (see `/usr/share/doc/manpages/copyright`) |

Rendering used `groff-base` {v_groff} (a prelude forcing `.ad l` and no hyphenation, then `preconv | tbl | groff -Tutf8 -man -rLL=80n -rHY=0 -P-cbou`:
80 columns, ragged right, no hyphenation; header/footer lines and the 7-column body indent removed).

## Splits

Each *source* document (a `.rst` file, a dictionary block, a man page) is assigned to a split by
`sha256("moe-compress-split-v1:" + source_id) mod {n_buckets}`: bucket 27 = calib, 28 = valid, 29 = test,
others = train (90 / 3.3 / 3.3 / 3.3 % of sources). Sources longer than {max_chars} characters are cut at
paragraph boundaries into chunks with ids `source#NNN`; chunks of one source always share its split.
Near-empty documents are dropped (minimum characters: {min_chars}). Within a split, documents are ordered by
`sha256("moe-compress-order-v1:" + source_id)`, then id. The committed files are the first whole
documents of the full split files, capped at {cap} bytes per file; `train` is not committed.

| domain | split | docs | sources | characters | committed docs | committed characters |
|---|---|---:|---:|---:|---:|---:|
{rows}

## Rebuild

```
python scripts/build_corpus.py            # apt-get installs the packages above if missing (needs root/sudo)
```

Full splits are written to `build/corpus/<domain>/<split>.jsonl` (git-ignored), these copies to
`src/moe_compress/assets/data/<domain>/`. The output is a deterministic function of the Debian package
versions listed above.
"""


def write_readme(path: Path, stats: dict[str, dict[str, dict[str, int]]], versions: dict[str, str]) -> None:
    """Document sources, licenses, split rule and sizes next to the committed data."""
    rows = []
    for domain in DOMAINS:
        for split in SPLITS:
            s = stats[domain][split]
            rows.append(
                f"| {domain} | {split} | {s['docs']:,} | {s['sources']:,} | {s['chars']:,} | "
                f"{s.get('asset_docs', 0):,} | {s.get('asset_chars', 0):,} |"
            )
    path.write_text(
        README.format(
            pydoc_dir=PYDOC_DIR, gcide=GCIDE_DICT, v_pydoc=versions["python3.11-doc"], v_gcide=versions["dict-gcide"],
            v_man=versions["manpages"], v_mandev=versions["manpages-dev"], v_groff=versions["groff-base"],
            n_buckets=N_BUCKETS, max_chars=MAX_CHARS, cap=f"{ASSET_CAP_BYTES:,}", rows="\n".join(rows),
            min_chars=", ".join(f"{k}: {v}" for k, v in MIN_CHARS.items()),
        ),
        encoding="utf-8",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "corpus", help="full splits (git-ignored)")
    ap.add_argument("--assets", type=Path, default=ROOT / "src" / "moe_compress" / "assets" / "data")
    ap.add_argument("--no-apt", action="store_true", help="do not try to install missing Debian packages")
    args = ap.parse_args(argv)
    if not shutil.which("groff") and args.no_apt:
        sys.exit("groff missing (install groff-base)")
    versions = ensure_packages() if not args.no_apt else {p: _pkg_version(p) or "?" for ps in PACKAGES.values()
                                                          for p in ps + TOOLS}
    stats = build(args.out, args.assets)
    (args.out / "stats.json").write_text(json.dumps({"versions": versions, "stats": stats}, indent=1))
    write_readme(args.assets / "README.md", stats, versions)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
