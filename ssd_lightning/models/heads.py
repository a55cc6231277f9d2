"""Prediction head of one source: a 3x3 conv for box offsets and one for class logits."""

from __future__ import annotations

from torch import Tensor, nn


class SSDHead(nn.Module):
    """The loc and conf branches of one source; channels are laid out (box, value) per position."""

    def __init__(self, in_channels: int, boxes_per_location: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.loc = nn.Conv2d(in_channels, boxes_per_location * 4, 3, padding=1)
        self.conf = nn.Conv2d(in_channels, boxes_per_location * num_classes, 3, padding=1)
        for conv in (self.loc, self.conf):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    @staticmethod
    def _flatten(x: Tensor, values: int) -> Tensor:
        # [B, A*V, H, W] -> [B, H*W*A, V]: row-major positions, then the boxes of each position.
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, values)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._flatten(self.loc(x), 4), self._flatten(self.conf(x), self.num_classes)


def class_logit_conv(head: nn.Module) -> nn.Conv2d:
    """The conv that outputs a head's class logits: `SSDHead.conf`, or the 1x1 conv that ends a separable
    head's conf branch (e.g. to raise the background bias of a model)."""
    conf = getattr(head, "conf", None)
    convs = [m for m in conf.modules() if isinstance(m, nn.Conv2d)] if isinstance(conf, nn.Module) else []
    if not convs:
        raise TypeError(f"{type(head).__name__} has no conf branch")
    return convs[-1]
