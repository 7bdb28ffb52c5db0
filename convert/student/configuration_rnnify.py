"""Configuration of an rnnify student: the teacher's config plus which layers became which mixer."""
from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig

# keys of the teacher config that describe the teacher itself, not the architecture to rebuild
_TEACHER_ONLY_KEYS = ("architectures", "auto_map", "model_type", "transformers_version", "_name_or_path",
                      "layer_types", "dtype", "torch_dtype")

_STUDENT_KEYS = ("teacher_model_type", "teacher_layer_types", "teacher_sliding_window", "mixer", "mixer_layers",
                 "sliding_window", "attention_window", "attention_chunk_size", "attention_sink")

# Kept softmax layers limited to their last N tokens use transformers' "chunked_attention" cache slot: the
# cache is the same sliding-window layer as "sliding_attention" but sized by `attention_chunk_size`, a key
# the mixers' `sliding_window` does not share; the mask (sliding, not chunked) is built by the student.
WINDOWED_ATTENTION = "chunked_attention"


class RnnifyConfig(PreTrainedConfig):
    """Student config.

    Attributes beyond the copied teacher fields:
        teacher_model_type: the teacher's ``model_type`` (``llama``, ``qwen3``, ...);
        teacher_layer_types: the teacher config's own ``layer_types`` (None if it had none);
        teacher_sliding_window: the teacher's attention window (None: full attention);
        sliding_window: the window of ``hybrid_sliding`` mixer layers, else the teacher's;
        mixer: ``{"type": <mixer name>, <option>: <value>, ...}``;
        mixer_layers: indices of the layers whose attention was replaced;
        attention_window: kept softmax layers attend to (and cache) only their last N tokens; None: as the teacher
            (their layer type is then ``chunked_attention``, cache sized by ``attention_chunk_size`` = N);
        layer_types: per-layer cache type for transformers (``linear_attention``, ``hybrid_sliding``,
            ``chunked_attention`` (windowed), or the teacher's ``full_attention`` / ``sliding_attention``);
        attention_sink: windowed kept layers attend to one learned key/value per KV head in place of the
            first token once it has left their window (``attention_windowed.py``).
    """

    model_type = "rnnify"

    def __init__(self, teacher_model_type: str = "llama", teacher_layer_types: list | None = None,
                 teacher_sliding_window: int | None = None, mixer: dict | None = None,
                 mixer_layers: list | None = None, layer_types: list | None = None, use_cache: bool = True,
                 attention_window: int | None = None, attention_sink: bool = False, **kwargs):
        self.use_cache = use_cache   # transformers treats it as a generation key unless declared
        self.teacher_model_type = teacher_model_type
        self.teacher_layer_types = teacher_layer_types
        self.teacher_sliding_window = teacher_sliding_window
        self.mixer = mixer or {"type": "hedgehog"}
        self.mixer_layers = list(mixer_layers or [])
        self.attention_window = attention_window
        self.attention_sink = bool(attention_sink and attention_window)
        kwargs.pop("attention_chunk_size", None)
        super().__init__(**kwargs)
        self.attention_chunk_size = attention_window   # what transformers sizes the windowed layers' cache by
        # set after the base init so that no legacy remapping of layer types touches ours
        self.layer_types = layer_types

    @classmethod
    def from_teacher(cls, teacher_config, mixer: dict, mixer_layers: list[int], layer_types: list[str],
                     sliding_window: int | None, attention_window: int | None = None, attention_sink: bool = False):
        fields = {k: v for k, v in teacher_config.to_dict().items() if k not in _TEACHER_ONLY_KEYS}
        teacher_window = getattr(teacher_config, "sliding_window", None)
        fields["sliding_window"] = sliding_window or teacher_window
        return cls(teacher_model_type=teacher_config.model_type,
                   teacher_layer_types=getattr(teacher_config, "layer_types", None), teacher_sliding_window=teacher_window,
                   mixer=dict(mixer), mixer_layers=sorted(mixer_layers), layer_types=list(layer_types),
                   attention_window=attention_window, attention_sink=attention_sink, **fields)

    def to_teacher_config(self):
        """Rebuild the teacher's own config class (transformers' registry) from the copied fields."""
        fields = {k: v for k, v in self.to_dict().items()
                  if k not in _TEACHER_ONLY_KEYS and k not in _STUDENT_KEYS}
        fields["sliding_window"] = self.teacher_sliding_window
        if self.teacher_layer_types is not None:
            fields["layer_types"] = self.teacher_layer_types
        return AutoConfig.for_model(self.teacher_model_type, **fields)


def attention_layer_types(config) -> list[str]:
    """The teacher's per-layer attention types, inferred the way transformers does when absent."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers
