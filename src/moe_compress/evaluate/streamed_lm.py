"""lm-evaluation-harness scoring for a model streamed layer by layer.

lm-eval's `HFLM` calls the model once per batch of requests; streamed, each call would read
the whole checkpoint. `StreamedLM` instead collects every log-likelihood request of a run,
runs all of them through the model in one layer-streamed pass (`evaluate.streamed`), and
answers them from that pass. Tokenisation (trailing spaces moved to the continuation, an
end-of-text prefix for empty contexts) is lm-eval's own (`TemplateLM`), so scores match HFLM.

Sequences are right-padded within a batch: attention is causal, so padding after a sequence
never changes its logits, and no attention mask is needed. Generation tasks are not
supported in streamed mode (each generated token would need a full pass over the weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import MoECompressError, param
from ..source.residency import Weights
from .streamed import streamed_logits


class StreamedLM(TemplateLM):
    backend = "causal"

    def __init__(
        self, model: PreTrainedModel, weights: Weights, tokenizer: PreTrainedTokenizerBase, batch_size: int = 8, device: str = "cpu"
    ):
        super().__init__()
        self.model, self.weights, self._tokenizer = model, weights, tokenizer
        self.batch_size, self._device = batch_size, device
        self.max_length = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return getattr(self._tokenizer, "name_or_path", "tokenizer")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self._tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # input = (context + continuation)[:-1], truncated on the left to the model's positions
        items = []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1) :]
            items.append((whole[:-1], continuation))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        batches, members = [], []
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            width = max(len(items[i][0]) for i in chosen)
            ids = torch.full((len(chosen), width), self.eot_token_id or 0, dtype=torch.long)
            for row, i in enumerate(chosen):
                ids[row, : len(items[i][0])] = torch.tensor(items[i][0])
            batches.append(ids)
            members.append(chosen)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(items)

        def score(batch_index: int, logits: torch.Tensor) -> None:
            log_probs = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(members[batch_index]):
                inputs, continuation = items[i]
                positions = torch.arange(len(inputs) - len(continuation), len(inputs))
                rows = log_probs[row, positions]
                target = torch.tensor(continuation, device=rows.device)
                greedy = bool((rows.argmax(dim=-1) == target).all())
                results[i] = (float(rows.gather(1, target[:, None]).sum()), greedy)

        streamed_logits(self.model, self.weights, batches, score, self._device, "scoring tasks (layers)")
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise MoECompressError(f"rolling log-likelihood tasks are not supported on a streamed model; use perplexity ({param('sources')}) instead.")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise MoECompressError("generation tasks are not supported on a streamed model (each token would read every layer).")
