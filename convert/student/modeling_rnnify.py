"""rnnify student: the teacher's architecture with some attention layers replaced by recurrent mixers.

The teacher's own decoder (embeddings, blocks, norms, rotary embedding, lm_head) is built from
transformers' registry; the student only swaps ``layers[i].self_attn`` for a mixer that keeps the
teacher's projections, and drives the blocks with a decoder loop that hands each layer the mask
its type needs.  The cache is transformers' ``DynamicCache(config=...)``: ``linear_attention``
layers keep one [H, Dk, Dv] state whatever the length, ``hybrid_sliding`` layers add a window of
keys, kept softmax layers keep their usual KV cache (windowed ones: transformers' sliding layer, a ``WindowRing``
of slots while decoding one token at a time; see ``attention_windowed.py``).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer
from transformers.masking_utils import (create_causal_mask, create_sliding_window_causal_mask,
                                       find_packed_sequence_indices)
from transformers.modeling_outputs import CausalLMOutputWithPast

# one import line per file: transformers copies an exported student's files by `from .x import` lines
from .arch_llama import Llama  # noqa: F401  (registers the architecture)
from .arch_mistral import Mistral  # noqa: F401
from .arch_phi3 import Phi3  # noqa: F401
from .arch_qwen2 import Qwen2  # noqa: F401
from .arch_qwen3 import Qwen3  # noqa: F401
from .mixer_gated_deltanet import GatedDeltaNet  # noqa: F401  (registers the mixer)
from .mixer_gla import GLA  # noqa: F401
from .mixer_hedgehog import Hedgehog  # noqa: F401
from .mixer_mamba2 import Mamba2  # noqa: F401
from .attention_windowed import (WINDOWED_IMPLEMENTATION, BlockedWindow, RingMask, WindowRing, add_attention_sink,
                                 ring_bias)
from .arch_registry import get_architecture
from .configuration_rnnify import WINDOWED_ATTENTION, RnnifyConfig, attention_layer_types
from .mixer_registry import Mixer, PackedSequences, get_mixer

_ATTENTION_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


class RnnifyPreTrainedModel(PreTrainedModel):
    config_class = RnnifyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        # mixers own the init of their new parameters; everything else is the teacher's standard init
        if isinstance(module, Mixer):
            module.reset_rnnify_parameters()
        else:
            super()._init_weights(module)


class RnnifyForCausalLM(RnnifyPreTrainedModel, GenerationMixin):
    """Causal LM whose layers ``config.mixer_layers`` mix tokens with ``config.mixer`` instead of attention."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RnnifyConfig):
        super().__init__(config)
        teacher_config = config.to_teacher_config()
        teacher_config._attn_implementation = config._attn_implementation
        teacher = AutoModelForCausalLM.from_config(teacher_config)
        self.model = teacher.model
        self.lm_head = teacher.lm_head
        arch = get_architecture(config.teacher_model_type)
        mixer_cls = get_mixer(config.mixer["type"])
        for i in config.mixer_layers:
            block = self.model.layers[i]
            block.self_attn = mixer_cls(block.self_attn, arch, teacher_config, config.mixer, i)
        self._teacher_config = teacher_config
        self._teacher_layer_types = attention_layer_types(teacher_config)
        self._teacher_mode = False
        self.route_windowed_attention()
        self.post_init()
        # transformers initialises parents before children, so a mixer's own Linear/conv layers received the
        # teacher's random init after the mixer's reset: reset the mixers last
        for module in self.modules():
            if isinstance(module, Mixer):
                module.reset_rnnify_parameters()

    def route_windowed_attention(self) -> None:
        """Kept softmax layers of type ``chunked_attention`` (``config.attention_window``) dispatch through
        the blocked-window implementation, with their attention sink if ``config.attention_sink``; call again
        after a layer's type changes."""
        if not self.config.attention_window:
            return
        for i, kind in enumerate(self.config.layer_types):
            attn = self.model.layers[i].self_attn
            if kind != WINDOWED_ATTENTION or hasattr(attn.config, "rnnify_base_attention"):
                continue
            if self.config.attention_sink:
                add_attention_sink(attn)
            routed = copy.copy(attn.config)   # this layer's view of the teacher config; the others keep theirs
            routed.rnnify_base_attention = attn.config._attn_implementation or "sdpa"
            routed.rnnify_attention_window = self.config.attention_window
            routed._attn_implementation_internal = WINDOWED_IMPLEMENTATION
            attn.config = routed

    @staticmethod
    def packed_sequences(position_ids: torch.Tensor) -> PackedSequences | None:
        """Document boundaries of packed rows from ``position_ids`` [B, T] restarting at 0; None if unpacked."""
        seq_idx = find_packed_sequence_indices(position_ids)
        return PackedSequences(seq_idx) if seq_idx is not None else None

    @contextmanager
    def teacher_attention(self, capture: dict | None = None, layers=None):
        """Within this context every converted layer runs the teacher's own attention: the model is the teacher.

        With ``capture`` (a dict), each converted layer i stores ``capture[i] = (attention input, attention
        output)``, the targets of attention transfer.  No cache is used in this mode.  With ``layers`` (converted
        layer indices), only those run the teacher's attention and the rest stay as they are (layer selection);
        kept windowed layers then keep their window.
        """
        if layers is not None:
            chosen = [self.model.layers[i].self_attn for i in layers]
            for m in chosen:
                m.teacher_mode = True
            try:
                yield self
            finally:
                for m in chosen:
                    m.teacher_mode = False
            return
        mixers = [m for m in self.modules() if isinstance(m, Mixer)]
        routed = [layer.self_attn.config for layer in self.model.layers
                  if hasattr(getattr(layer.self_attn, "config", None), "rnnify_base_attention")]
        self._teacher_mode = True
        for m in mixers:
            m.teacher_mode, m.capture = True, capture
        for config in routed:   # windowed kept layers attend fully, as the teacher's do
            config.rnnify_attention_window = None
        try:
            yield self
        finally:
            self._teacher_mode = False
            for m in mixers:
                m.teacher_mode, m.capture = False, None
            for config in routed:
                config.rnnify_attention_window = self.config.attention_window

    @contextmanager
    def recurrent_part_off(self):
        """Within this context every mixer's recurrent part is switched off: mixers with a softmax window keep
        only the window (and sink), the others output zero.  The component ablation: what the recurrence adds."""
        mixers = [m for m in self.modules() if isinstance(m, Mixer)]
        for m in mixers:
            m.recurrent_off = True
        try:
            yield self
        finally:
            for m in mixers:
                m.recurrent_off = False

    @contextmanager
    def mixer_window(self, window: int):
        """Within this context every windowed mixer uses a softmax window of ``window`` tokens (keys older than that
        enter its recurrent state instead): for training only, without a cache.  A window shorter than the one
        the student runs with makes the feature maps carry context the window would otherwise cover."""
        mixers = [m for m in self.modules() if isinstance(m, Mixer) and getattr(m, "has_window", False)]
        saved = [m.window for m in mixers]
        for m in mixers:
            m.window = window
        try:
            yield self
        finally:
            for m, w in zip(mixers, saved):
                m.window = w

    def set_window_dropout(self, probability: float) -> None:
        """While training (and only then), each windowed mixer drops its softmax window for a random
        ``probability`` of (row, head) pairs, which then run linear attention over every key: the feature maps
        must carry the whole context there, not only what has left the window.  0 switches it off."""
        if not 0.0 <= probability < 1.0:
            raise ValueError(f"window dropout must be in [0, 1), got {probability}")
        mixers = [m for m in self.modules() if isinstance(m, Mixer) and getattr(m, "has_window", False)]
        if probability and not mixers:
            raise ValueError("window dropout needs mixers with a softmax window (convert.mixer.window)")
        for m in mixers:
            m.window_dropout = probability

    def window_shares(self) -> dict[int, float]:
        """Per converted layer with a softmax window: the mean learned window share (0.5 at conversion)."""
        shares = {i: getattr(self.model.layers[i].self_attn, "window_share", lambda: None)()
                  for i in self.config.mixer_layers}
        return {i: v for i, v in shares.items() if v is not None}

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def _position_ids(self, attention_mask, cache, T, device):
        """Positions count real tokens only (left padding starts at 0), continuing after the cache."""
        if attention_mask is not None and attention_mask.dim() == 2:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        past = getattr(cache, "rnnify_seen_tokens", 0) if cache is not None else 0
        return torch.arange(past, past + T, device=device)[None]

    def _blocked_window_applies(self, attention_mask, cache, packed, T: int) -> bool:
        """A prompt from position 0, unpadded, one document: causal attention (T <= W) or O(T·W) blocks suffice."""
        if T == 1 or packed is not None:
            return False
        if cache is not None and getattr(cache, "rnnify_seen_tokens", 0):
            return False
        return attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all()))

    @staticmethod
    def _window_rings(cache, T: int, layer_types: list[str]) -> bool:
        """Kept windowed layers decode over ``WindowRing`` caches: one token per step, from a prefilled cache.
        Turns their cache layers into rings (T == 1) or back into transformers' ordered layers (T > 1); True if
        this step decodes over rings.  (A cache that records the past, for assisted decoding, stays ordered.)"""
        if cache is None or not hasattr(cache, "layers"):
            return False
        rings = False
        for i, kind in enumerate(layer_types):
            layer = cache.layers[i]
            if kind != WINDOWED_ATTENTION:
                continue
            if T != 1 and isinstance(layer, WindowRing):
                cache.layers[i] = layer.to_ordered()
            elif T == 1 and type(layer) is DynamicSlidingWindowLayer and layer.is_initialized and not layer.record_past:
                cache.layers[i] = layer = WindowRing.from_ordered(layer)
            rings = isinstance(layer, WindowRing) and T == 1
        return rings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        legacy_cache = kwargs.pop("past_key_values", None)   # the pre-5.x name of `cache`
        cache = legacy_cache if cache is None else cache
        hidden, cache = self.final_hidden_states(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                                 use_cache, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def final_hidden_states(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                            inputs_embeds=None, use_cache=None, **kwargs):
        """The last block's output after the final norm, [B, T, hidden] (what ``lm_head`` reads), and the cache:
        ``forward`` without the LM head (a distillation loss applies it a chunk of positions at a time)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        base = self.model
        if inputs_embeds is None:
            inputs_embeds = base.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        # layers running the teacher's attention alone (teacher_attention(layers=...)) take the teacher's mask
        partial = {i for i in self.config.mixer_layers if self.model.layers[i].self_attn.teacher_mode}
        if self._teacher_mode or partial:
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        T = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = self._position_ids(attention_mask, cache, T, inputs_embeds.device)

        # packed rows (transformers' convention: no mask, no cache, position_ids restarting at 0 per document):
        # attention masks are made block-diagonal by transformers, mixers restart their state per document
        packed = None
        if attention_mask is None and cache is None and T > 1:
            packed = self.packed_sequences(position_ids.expand(inputs_embeds.shape[0], -1))
        layer_types = self._teacher_layer_types if self._teacher_mode else [
            self._teacher_layer_types[i] if i in partial else kind for i, kind in enumerate(self.config.layer_types)]
        decoding_rings = WINDOWED_ATTENTION in layer_types and self._window_rings(cache, T, layer_types)
        masks = {}
        for kind in set(layer_types):
            mask_config = self._teacher_config if self._teacher_mode or kind not in self.config.layer_types \
                else self.config
            first = layer_types.index(kind)   # the cache layer whose length/offset the mask must follow
            if kind == WINDOWED_ATTENTION and self._blocked_window_applies(attention_mask, cache, packed, T):
                masks[kind] = BlockedWindow(self.config.attention_window)
            elif kind == WINDOWED_ATTENTION and decoding_rings:
                first_layer = cache.layers[first]
                masks[kind] = RingMask(ring_bias(first_layer.cumulative_length, first_layer.sliding_window,
                                                 attention_mask, position_ids, bool(self.config.attention_sink),
                                                 inputs_embeds.dtype))
            elif kind == WINDOWED_ATTENTION:   # kept softmax attention over the last attention_window tokens
                windowed = copy.copy(mask_config)
                windowed.sliding_window = self.config.attention_window
                if self.config.attention_sink:   # the sink's column is added to a boolean (sdpa-style) mask
                    windowed._attn_implementation_internal = "sdpa"
                masks[kind] = create_sliding_window_causal_mask(
                    config=windowed, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                    position_ids=position_ids, layer_idx=first)
            elif kind in _ATTENTION_MASKS:
                masks[kind] = _ATTENTION_MASKS[kind](
                    config=mask_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    cache=cache, position_ids=position_ids, layer_idx=first)
            elif packed is not None:
                masks[kind] = packed
            else:   # mixers take the 2D padding mask (full length, so windowed layers can use it too)
                masks[kind] = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None

        hidden = inputs_embeds
        position_embeddings = base.rotary_emb(hidden, position_ids=position_ids)
        for i, block in enumerate(base.layers):
            hidden = block(hidden, attention_mask=masks[layer_types[i]], position_ids=position_ids,
                           cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        hidden = base.norm(hidden)
        if cache is not None:
            cache.rnnify_seen_tokens = getattr(cache, "rnnify_seen_tokens", 0) + T
        return hidden, cache


__all__ = ["RnnifyForCausalLM", "RnnifyPreTrainedModel"]
