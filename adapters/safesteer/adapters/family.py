"""Model families: which served models one safety adapter fits.

Fine-tunes of one base keep its architecture, hidden size and depth, so those three facts
name the family. The id is stable across fine-tunes and across file formats (GGUF, HF folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KNOWN_ALIASES: dict[str, str] = {
    "llama-576x30": "smollm2-135m",
    "qwen2-896x24": "qwen2.5-0.5b",
}


@dataclass(frozen=True)
class ModelFamily:
    """The architecture facts a safety adapter must match."""

    model_type: str
    hidden_size: int
    num_layers: int

    @property
    def id(self) -> str:
        return f"{self.model_type}-{self.hidden_size}x{self.num_layers}"

    @property
    def alias(self) -> str:
        return KNOWN_ALIASES.get(self.id, self.id)

    @classmethod
    def from_config(cls, config: Any) -> ModelFamily:
        """Read the family of a transformers `PretrainedConfig` (text config for multimodal)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(
            model_type=str(text.model_type),
            hidden_size=int(text.hidden_size),
            num_layers=int(text.num_hidden_layers),
        )
