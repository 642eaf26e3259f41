"""A condensed model saved to disk and reloaded (through its generated code) can be fine-tuned."""

from __future__ import annotations

import torch

from moe_compress import CondenseLayer, Plan, compress, finetune, get_adapter, load_model
from moe_compress.runtime import ConstantRouter
from tiny_checkpoints import save_tiny_checkpoint, write_calibration


def test_condense_save_reload_finetune_changes_only_the_condensed_layers(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")  # MoE layers 1 and 2, with shared experts
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    model, tokenizer = load_model(checkpoint)
    condensed = Plan(model_type="qwen2_moe", top_k=2, layers=[CondenseLayer(layer=2, num_experts=8, keep=[1, 5], condensed_weights=[0.6, 0.3])], method="cd-moe")
    compress(model, plan=condensed, tokenizer=tokenizer, out=tmp_path / "condensed", ignore_plan_identity=True)

    reloaded, tokenizer = load_model(tmp_path / "condensed")  # generated code: no --trust-remote-code needed
    adapter = get_adapter(reloaded)
    router = adapter.router(adapter.moe_block(adapter.decoder_layers(reloaded)[2]))
    assert type(router).__name__ == "ConstantRouter" and not isinstance(router, ConstantRouter), "the reload's own class"

    before = {name: p.detach().clone() for name, p in reloaded.named_parameters()}
    report = finetune(reloaded, tokenizer, data=str(calib), steps=3, lr=1e-2, batch_size=2, seq_len=32, eval_data=None,
                      out=tmp_path / "tuned", device="cpu")
    changed = {name for name, p in reloaded.named_parameters() if not torch.equal(p, before[name])}
    assert report["trainable_parameters"] > 0 and changed
    assert all(name.startswith("model.layers.2.mlp.") for name in changed), sorted(changed)
    assert any(".experts." in name for name in changed) and any("shared_expert." in name for name in changed)

    tuned, _ = load_model(tmp_path / "tuned")
    from moe_compress.finetuning import condensed_layers

    assert condensed_layers(reloaded) == [2] and condensed_layers(tuned) == [2]
    assert all(torch.equal(p, reloaded.state_dict()[name]) for name, p in tuned.state_dict().items())
