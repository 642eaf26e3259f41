"""fit's report page (fit_report.html) and its plot of the front: written with the output, every candidate and the
chosen allocation in it, text escaped, allocation entries rendered from whatever keys they hold, the marks by role."""

from __future__ import annotations

import base64
import html
import json
import re

import pytest

import moe_compress as mc
from helpers import tensor_bytes
from moe_compress.fitting.front_plot import MIB, ROLES, legend_handles, mark, plot
from moe_compress.fitting.report_page import page
from moe_compress.stages.sizes import checkpoint_sizes
from moe_compress.text.fit_card import allocation_lines, allocation_rows
from tiny_checkpoints import save_tiny_checkpoint

TINY_CALIB = mc.CalibrationSpec(samples=4, seq_len=32)


def test_a_fit_writes_its_report_page(tmp_path):
    """After a fit: fit_report.html beside the checkpoint, self-contained (the PNG on disk embedded, nothing fetched), a row per
    candidate, the chosen one marked, one allocation row per MoE layer with the kept counts (of the original's), bits and experts raised of
    the report; fit_report.md and the model card point to it."""
    tiny = save_tiny_checkpoint(tmp_path / "tiny", "mixtral")
    out = tmp_path / "out"
    result = mc.fit(str(tiny), memory=int(tensor_bytes(tiny) * 0.7), calib=TINY_CALIB, out=out, windows=2, seq_len=32)
    report = json.loads((out / "fit_report.json").read_text())
    text = (out / "fit_report.html").read_text()
    assert text.startswith("<!doctype html>") and text.endswith("</body></html>")
    assert not re.search(r"<script|<link|src=\"(?!data:)", text)
    (embedded,) = re.findall(r'<img alt="fit_report" src="data:image/png;base64,([^"]+)">', text)
    assert base64.b64decode(embedded) == (out / "fit_report.png").read_bytes()
    assert len(result.candidates) >= 3
    for c in report["candidates"]:
        name = html.escape(c["name"] + (f" (= {', '.join(c['aliases'])})" if c["aliases"] else ""))
        if c["name"] == report["chosen"]:  # marked: every cell of its row, none of another
            assert text.count(f'<tr><td class="chosen">{name} (chosen)</td><td class="chosen">{c["bytes"]}</td>') == 1
            assert text.count('class="chosen"') == 9 and c["bytes"] == result.best.bytes
        else:
            assert f"<tr><td>{name}</td><td>{c['bytes']}</td>" in text
    allocation = text.split("<h2>Allocation of the chosen candidate, per MoE layer</h2>")[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\d+) of (\d+)</td><td>(\d+)</td>(?:<td>([^<]*)</td>)?</tr>", allocation)
    sizes = checkpoint_sizes(tiny)
    # a column for the experts raised to a wider width where any layer has some ("-" in the others')
    raised = any(c.wider for c in result.best.allocation.values())
    assert rows == [(str(layer), str(c.keep), str(sizes.layers[layer].experts), str(c.bits), c.entry().get("raised", "-" if raised else ""))
                    for layer, c in result.best.allocation.items()]
    assert [int(layer) for layer, *_ in rows] == sorted(sizes.layers) and report["experts"] == {str(i): 8 for i in sizes.layers}
    assert "`fit_report.html`" in (out / "fit_report.md").read_text() and "`fit_report.html`" in (out / "README.md").read_text()


def _report(names: list[str], windows: list[int], allocation: dict) -> dict:
    candidates = [{"name": name, "aliases": [], "bytes": (10 - i) * MIB, "proxy": 0.1 * (i + 1), "other_bits": 16, "allocation": allocation,
                   "kl": 0.01 * (i + 1), "top1": 0.9, "perplexity": 20.0 + i, "original_perplexity": 19.5, "windows": count,
                   "first_slice_kl": 0.01}
                  for i, (name, count) in enumerate(zip(names, windows))]
    return {"budget": 11 * MIB, "kv_cache_bytes": 0, "weight_budget": 11 * MIB, "original_bytes": 20 * MIB, "smallest_reachable_bytes": 4 * MIB,
            "unchanged": False, "chosen": names[0], "candidates": candidates, "held_out_windows": 8, "spearman_proxy_vs_kl": 1.0, "front": {},
            "experts": {"0": 8, "1": 8}, "best_single_method": None}


def test_the_page_escapes_names_and_renders_any_allocation_entry():
    """A name with markup shows as text; an entry with a key the search may gain (a dropped layer) gets its own column,
    "-" where a layer lacks a key, and booleans as yes / no -- on the page and in the markdown alike."""
    allocation = {"0": {"keep": 6, "bits": 4}, "1": {"dropped": True}}
    report = _report(["fit <b>x</b>", "4-bit alone & <script>", "fit (front 1)"], [8, 8, 2], allocation)
    text = page(report, None)
    assert "fit &lt;b&gt;x&lt;/b&gt; (chosen)</td>" in text and "<td>4-bit alone &amp; &lt;script&gt;</td>" in text
    assert "<b>x" not in text and "<script>" not in text and "<title>moe-compress fit: fit &lt;b&gt;x&lt;/b&gt;</title>" in text
    assert ("<table><tr><th>MoE layer</th><th>experts kept</th><th>bits</th><th>dropped</th></tr>"
            "<tr><td>0</td><td>6 of 8</td><td>4</td><td>-</td></tr><tr><td>1</td><td>-</td><td>-</td><td>yes</td></tr></table>") in text
    assert "<td>fit (front 1)</td><td>8388608</td><td>as stored</td><td>0.3</td><td>0.03</td><td>0.9000</td><td>22.000</td><td>2</td><td>yes, of 8</td>" in text
    assert "No plot: matplotlib is not installed" in text and "<img" not in text
    assert allocation_rows(report["candidates"][0]) == (["MoE layer", "experts kept", "bits", "dropped"], [["0", "6", "4", "-"], ["1", "-", "-", "yes"]])
    assert allocation_lines(report["candidates"][0])[:4] == ["| MoE layer | experts kept | bits | dropped |", "|---:|---:|---:|---:|",
                                                             "| 0 | 6 | 4 | - |", "| 1 | - | - | yes |"]


def test_the_front_plot_marks_candidates_by_role_hollow_when_stopped(tmp_path):
    """The chosen one a large star, a single method distinct from the search's candidates, one stopped early hollow (and
    the legend says so), the budget a vertical line; the plot has a KL and a perplexity panel."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    report = _report(["fit", "4-bit alone", "fit (front 1)"], [8, 8, 2], {"0": {"keep": 8, "bits": 4}})
    figure, axis = plt.subplots()
    mark(axis, report, "kl")
    chosen, single, stopped = axis.collections
    assert chosen.get_sizes().tolist() == [ROLES["chosen"][3]] and tuple(chosen.get_facecolors()[0]) == to_rgba(ROLES["chosen"][1])
    assert tuple(single.get_edgecolors()[0]) == to_rgba(ROLES["single"][1]) == tuple(single.get_facecolors()[0])
    assert len(stopped.get_facecolors()) == 0 and tuple(stopped.get_edgecolors()[0]) == to_rgba(ROLES["search"][1])  # hollow
    assert [c.get_offsets().tolist() for c in axis.collections] == [[[10.0, 0.01]], [[9.0, 0.02]], [[8.0, 0.03]]]
    assert list(axis.lines[0].get_xdata()) == [11.0, 11.0]
    labels = [h.get_label() for h in legend_handles([report])]
    assert labels == ["search candidate", "single method alone (baseline at the budget)", "chosen",
                      "hollow: stopped early by the race (measured on fewer windows)", "weight budget"]
    plt.close(figure)
    path = plot(report, tmp_path / "front.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_is_drawn_on_a_terminal_and_kept_as_markdown_in_a_pipe(monkeypatch, capsys):
    import sys

    from moe_compress.fitting.command import _print_report

    document = "| candidate | KL |\n|---|---:|\n| fit \\(front 1\\) | 0.5 |\n"
    _print_report(document)
    assert capsys.readouterr().out == document + "\n"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    _print_report(document)
    drawn = capsys.readouterr().out
    assert "fit (front 1)" in drawn and "\\(" not in drawn and "|---" not in drawn
