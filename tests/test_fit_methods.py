"""fit with every method that takes per-layer kept counts: MoNE (novices priced by their residual, their bytes in the
table), C-Prune, the merging methods; the proxies keep what the methods' own plans keep; unknown methods refused."""

from __future__ import annotations

import pytest
import torch

import moe_compress as mc
from moe_compress import MoECompressError
from moe_compress.arch.registry import get_adapter
from moe_compress.engine.prepare import calibration_batches
from moe_compress.engine.statistics import collect_statistics
from moe_compress.fitting import search
from moe_compress.fitting.accepted import FIT_METHODS
from moe_compress.fitting.fit_method import FitMethod
from moe_compress.fitting.proxies import ENERGY, NOVICE_SUMS, layer_proxies, novice_residual, proxy_statistics
from moe_compress.methods import METHODS
from moe_compress.source.checkpoint import Checkpoint
from moe_compress.source.load import load_model
from moe_compress.stages.footprint import Footprint
from moe_compress.stages.sizes import candidate_bytes, checkpoint_sizes
from tiny_checkpoints import tiny_tokenizer
from tiny_models import tiny_model

#: Two calibration batches: MoNE's running variance needs more than one.
CALIB = mc.CalibrationSpec(samples=4, seq_len=32, batch_size=2)


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """A tiny Mixtral with 16 experts per layer: C-Prune clusters into 12, so it needs more experts than that."""
    directory = tmp_path_factory.mktemp("fitmethods") / "tiny16"
    tokenizer = tiny_tokenizer()
    tiny_model("mixtral", num_local_experts=16, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=0, eos_token_id=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_fit_methods_are_the_registered_methods_that_take_explicit_counts():
    assert sorted(FIT_METHODS) == sorted(name for name, method in METHODS.items() if method.explicit_budget)
    assert [name for name, method in METHODS.items() if method.substitutes] == ["mone"]


def test_an_unknown_method_is_refused_in_one_line_naming_the_accepted(tiny16):
    from typer.testing import CliRunner

    from moe_compress.cli import app

    with pytest.raises(MoECompressError) as refused:
        mc.fit(str(tiny16), target_ratio=0.5, method="cprune-cosine", dry_run=True)
    message = str(refused.value)
    assert "\n" not in message and "'cprune-cosine'" in message and all(name in message for name in FIT_METHODS)
    run = CliRunner().invoke(app, ["fit", str(tiny16), "--target-ratio", "0.5", "--method", "nonesuch", "--dry-run"])
    assert run.exit_code == 2 and "got 'nonesuch'" in run.output and "hc-smoe" in run.output


def test_method_options_are_checked_by_the_methods_types_before_anything_is_read(tiny16):
    from typer.testing import CliRunner

    from moe_compress.cli import app

    for options, named in (({"nope": 1}, "'nope'"), ({"clusters": "many"}, "'clusters'")):
        with pytest.raises(MoECompressError) as refused:
            mc.fit(str(tiny16), target_ratio=0.5, method="cprune", method_options=options, dry_run=True)
        assert "\n" not in str(refused.value) and named in str(refused.value)
    for pair in ("nope=1", "clusters=many", "clusters"):
        run = CliRunner().invoke(app, ["fit", str(tiny16), "--target-ratio", "0.5", "--method", "cprune", "--option", pair, "--dry-run"])
        assert run.exit_code == 2 and f"{pair.partition('=')[0]}" in run.output and len(run.output.strip().splitlines()) == 1, (pair, run.output)
    shown = CliRunner().invoke(app, ["fit", str(tiny16), "--target-ratio", "0.5", "--method", "cprune", "--option", "clusters=4", "--dry-run"])
    assert shown.exit_code == 0, shown.output


def test_novice_residual_is_the_gated_error_of_the_mean_output():
    """N_e = sum over T_e of w^2 ||f - n||^2, n the mean of f over T_e, from the sums the observer keeps."""
    generator = torch.Generator().manual_seed(3)
    outputs = [torch.randn(n, 4, generator=generator, dtype=torch.float64) + 2.0 for n in (5, 3, 1)]
    gates = [torch.rand(o.shape[0], generator=generator, dtype=torch.float64) for o in outputs]
    means = [o.mean(0) for o in outputs]
    stats = {
        ENERGY: torch.stack([(w**2 * o.pow(2).sum(1)).sum() for o, w in zip(outputs, gates)]),
        NOVICE_SUMS: torch.stack([torch.cat([(w**2).sum().reshape(1), (w[:, None] ** 2 * o).sum(0)]) for o, w in zip(outputs, gates)]),
        "output_moments": torch.stack([torch.cat([torch.tensor([float(o.shape[0])], dtype=torch.float64), m, (o - m).pow(2).sum(0)])
                                       for o, m in zip(outputs, means)]),
    }
    expected = torch.stack([(w**2 * (o - m).pow(2).sum(1)).sum() for o, w, m in zip(outputs, gates, means)])
    torch.testing.assert_close(novice_residual(stats), expected, rtol=1e-10, atol=1e-12)
    assert float(novice_residual(stats)[2]) == pytest.approx(0.0, abs=1e-12)  # one token: its novice is exact
    assert (novice_residual(stats) < stats[ENERGY]).all()


def test_mone_bytes_keep_router_rows_and_add_a_vector_per_novice(tiny16):
    sizes = checkpoint_sizes(tiny16)
    layer = sizes.layers[1]
    assert layer.novice_bytes == 32 * 4  # hidden 32, float32
    plain = candidate_bytes(layer, 5, 16)
    assert candidate_bytes(layer, 5, 16, novices=True) == plain + 11 * (layer.router_per_expert + layer.novice_bytes) + 16 * 8
    assert candidate_bytes(layer, 16, 16, novices=True) == candidate_bytes(layer, 16, 16)  # nothing removed: the layer untouched
    stage = mc.Prune("mone", budget="explicit", keep={0: 16, 1: 5, 2: 2})
    assert stage.predict(Footprint.of(sizes)).bytes == sizes.fixed + sum(
        candidate_bytes(sizes.layers[i], k, 16, novices=True) for i, k in {0: 16, 1: 5, 2: 2}.items())


@pytest.mark.parametrize(("method", "options"), [("mone", {}), ("cprune", {}), ("cprune", {"clusters": 4}), ("hc-smoe", {}), ("ream", {})])
def test_proxies_keep_what_the_plans_keep_and_stages_weigh_what_is_written(method, options, tiny16, tmp_path):
    """The proxy's kept experts at each layer's count are the ones the candidate's own prune plan keeps, and a pruned
    candidate's stages, written, weigh what the table predicted (the search asserts the table equals the stages' prediction);
    with the method's options, the proxies, the candidates' prune stages and so the written plan all use them."""
    sizes = checkpoint_sizes(tiny16)
    budget = sizes.fixed + sum(candidate_bytes(layer, layer.experts, 4) for layer in sizes.layers.values()) + sum(
        block[4] - block[16] for block in sizes.others.values()) - 1  # below every weight at 4 bits: experts must go
    model, tokenizer = load_model(tiny16)
    adapter = get_adapter(model)
    batches = calibration_batches(CALIB, tokenizer, model.config)
    chosen = FitMethod(method, options)
    stats, _ = collect_statistics(model, batches, proxy_statistics(chosen, sizes.group_size), False)
    proxies = layer_proxies(chosen, adapter, model.config, stats, sizes.group_size)
    floors = {layer: sorted(p.kept) for layer, p in proxies.items()}
    found = search.candidates(sizes, floors, proxies, budget, chosen, {bits: 0.0 for bits in (16, 8, 4)})
    pruned = next(c for c in found if c.stages[0].kind == "prune" and c.stages[0].budget == "explicit")
    assert dict(pruned.stages[0].options) == options
    if options:  # the options change which experts the proxies price: a test that would pass with them dropped proves nothing
        plain = layer_proxies(FitMethod(method), adapter, model.config, stats, sizes.group_size)
        assert any(plain[layer].kept != proxies[layer].kept for layer in proxies)
    result = mc.compress(str(tiny16), pruned.stages, calib=CALIB, out=tmp_path / "out", guard=False)
    plan = result.plans[0][1]
    keep = pruned.stages[0].keep
    assert {lp.layer: sorted(lp.keep) for lp in plan.layers} == {layer: proxies[layer].kept[k] for layer, k in keep.items()}
    assert any(k < 16 for k in keep.values())
    assert Checkpoint(tmp_path / "out").total_bytes() == pruned.bytes == search.predicted_bytes(pruned.stages, sizes)
    if method == "mone":  # priced by the residual after the novice, which is below the energy removed
        removed = [e for e in range(16) if e not in proxies[1].kept[2]]
        assert float(proxies[1].removed_cost[removed].sum()) < float(proxies[1].energy[removed].sum())
        assert plan.layers[1].action == "novices"
