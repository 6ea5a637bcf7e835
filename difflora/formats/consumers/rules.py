"""What every consumer's key rules share: the Verdict a check returns and the CLIP naming they all use."""

from __future__ import annotations

from dataclasses import dataclass, field

from difflora.formats.naming import NameTable
from difflora.models.families import family as model_family

CLIP_SUFFIXES = {  # ComfyUI LORA_CLIP_MAP
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


@dataclass
class Verdict:
    consumer: str
    total: int
    loaded: int
    dropped: dict[str, str] = field(default_factory=dict)  # key -> why it is not loaded
    fatal: str = ""  # the consumer refuses the whole file
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.fatal and not self.dropped

    def summary(self) -> str:
        if self.fatal:
            return f"{self.consumer}: does NOT load: {self.fatal}"
        if not self.dropped:
            return f"{self.consumer}: loads all {self.total} keys"
        return f"{self.consumer}: {self.loaded}/{self.total} keys load, {len(self.dropped)} silently dropped"


def te_layer_names(table: NameTable, component: str) -> list[tuple[int, str]]:
    """(layer, CLIP suffix) pairs of a text encoder as the consumers hold it (some with more layers than
    diffusers: `ModelFamily.consumer_text_encoder_layers`)."""
    layers = {
        int(k.split(".")[4]) for k in table.modules if k.startswith(component + ".text_model.encoder.layers.")
    }
    count = model_family(table.family).consumer_text_encoder_layers.get(component, len(layers))
    return [(b, c) for b in range(count) for c in CLIP_SUFFIXES]
