"""Foundations of `moe-compress fit` (a compression chosen to fit a memory budget).

* `memory`: byte sizes as people write them, and the KV cache / recurrent state a model holds
  at a context length, from its config alone;
* `stages.sizes` (beside the stages whose sizes it predicts): the bytes of a checkpoint's parts
  and of each per-layer candidate (experts kept, bit width), from the config and the shard headers;
* `solver`: the multiple-choice knapsack that picks one candidate per layer under the budget.

Nothing is imported here: `memory` is read by the CLI at start-up, which must not pull torch.
"""
