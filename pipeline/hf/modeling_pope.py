"""A pope-pretrain model for Hugging Face transformers (shipped by `pope export` as modeling_pope.py).

The network is pipeline/model.py's Transformer itself: the export copies pipeline/model.py and
pipeline/positional.py beside this file (as pope_model.py and pope_positional.py, with their imports made
relative), so the logits are the training model's. This file only adapts it to PreTrainedModel and GenerationMixin:
- weights live under `model.` (model.embed.weight is also the output head: stored once);
- `labels` are shifted inside, as transformers expects of a causal LM; the loss is the training loss;
- generation keeps the project's own KVCache (keys after the position encoding) as `past_key_values`, so the
  model is "stateful" to transformers: no DynamicCache, and the decoding modes that roll a cache back (assisted,
  contrastive, DoLa) are refused by transformers itself; beam search reorders its rows (KVCache.reorder_cache);
- padding: right padding only. A 0 before a 1 in a row of attention_mask (left padding, or padding in the middle)
  raises a ValueError: the attention here knows no padding mask. Generate one prompt at a time, or batch prompts
  of one length.
Standard library, torch and transformers only.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_pope import PopeConfig
from .pope_model import IGNORE_INDEX, KVCache, Transformer
from .pope_positional import POSITION_KINDS  # noqa: F401  transformers copies only the relative imports named here


def model_fields(config: PopeConfig) -> types.SimpleNamespace:
    """The config as pope_model reads it: every field by attribute, rope_scaling too (a dict in config.json)."""
    fields = config.to_dict()
    fields["rope_scaling"] = types.SimpleNamespace(**(config.rope_scaling or {"type": "none"}))
    return types.SimpleNamespace(**fields)


def check_padding(attention_mask: torch.Tensor | None) -> None:
    """Refuse padding that is not on the right: the model attends to every earlier token."""
    if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError("attention_mask has padding before real tokens (left padding?); this model supports only "
                         "right padding: pad on the right, or generate one prompt at a time")


class PopeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PopeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _is_stateful = True  # its cache is pope_model.KVCache, not a transformers Cache (see the module docstring)

    def __init__(self, config: PopeConfig) -> None:
        super().__init__(config)
        self.model = Transformer(model_fields(config))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: the Transformer initialises itself when built (GPT-2's scheme), and loading overwrites it."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> None:
        return None  # the head is model.embed.weight itself (pope_model.Transformer.forward)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: KVCache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast | tuple:
        check_padding(attention_mask)
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache(len(self.model.blocks))
        targets = None
        if labels is not None:  # position i predicts labels[i + 1]; the last position predicts nothing
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        logits, loss = self.model(input_ids, targets=targets, positions=position_ids, cache=cache)
        if return_dict is False:
            return tuple(x for x in (loss, logits, cache) if x is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: KVCache | None = None,
                                      attention_mask: torch.Tensor | None = None, use_cache: bool = True,
                                      **kwargs) -> dict:
        """With a cache, only the tokens it has not seen; positions continue from it."""
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.length:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "use_cache": use_cache}
