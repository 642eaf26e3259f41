"""`moe-compress fit` / `mc.fit`: the best compression that fits a memory budget.

(Named `fitting`, not `fit`, because the package root exports the function `fit`: a submodule of
the same name would shadow it, see `_lazy`.)

* `memory`: byte sizes as people write them, and the KV cache / recurrent state a model holds
  at a context length, from its config alone;
* `stages.sizes` (beside the stages whose sizes it predicts): the bytes of a checkpoint's parts
  and of each per-layer candidate (experts kept, bit width), from the config and the shard headers;
* `solver`: the multiple-choice knapsack that picks one candidate per layer under the budget;
* `proxies`: each per-layer candidate's quality cost, from statistics of one calibration pass;
* `choices`: each MoE layer's choices (experts kept x width, the MoE or the whole block dropped) and the solver's table of them;
* `search`: the candidates worth measuring, each as a list of stages; `measure`: each measured end
  to end; `report` and `write`: the report and the chosen model written (`front_plot`: the front
  drawn; `report_page`: fit_report.html); `api`: `fit` itself;
  `command`: the body of the CLI command; `steps`: what the in-memory and the streamed paths share;
* `streamed`, `streamed_measure`, `streamed_write`: fit on a model read one decoder layer at a time.

Nothing is imported here: `command` (the command's options) is read by the CLI at start-up, which must not
pull torch.
"""
