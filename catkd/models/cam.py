"""The CAM form shared by every model, teacher or student.

A backbone exposes ``forward_features(x) -> (N, D, H, W)``: the last post-activation
feature map before global pooling, and ``num_features = D``. ``CAMClassifier`` puts a
1x1 convolution (the classifier's weights, C x D) on top of it, so that

    cam    = conv1x1_W(features)                  # (N, C, H, W)
    logits = cam.mean((2, 3)) [+ bias]            # (N, C)

which equals ``Linear(GAP(features))`` because pooling and a 1x1 convolution are both
linear. The bias is kept only for converted teachers: a student in CAM form has none,
and the bias never enters the CAM (DESIGN section 1).
"""

from __future__ import annotations

import torch
from torch import nn


class CAMClassifier(nn.Module):
    """A backbone plus a CAM head; ``forward`` returns ``(logits, cam)``."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        bias: bool = False,
        source_head: str = "fc",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        self.num_features: int = backbone.num_features
        self.head = nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None
        # Name of the Linear layer in the classifier form of this architecture
        # (e.g. "fc", "classifier.0"): the one conversion maps its weights onto `head`.
        self.source_head = source_head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.head(features)
        logits = cam.mean(dim=(2, 3))
        if self.bias is not None:
            logits = logits + self.bias
        return logits, cam

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))

    def classifier_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in classifier form: a Linear head named ``source_head``.

        A student has no bias in CAM form; its classifier form gets a zero bias so that
        plain classifier code can load it.
        """
        state = dict(self.backbone.state_dict())
        weight = self.head.weight.detach().flatten(1)
        state[f"{self.source_head}.weight"] = weight.clone()
        bias = self.bias.detach() if self.bias is not None else torch.zeros(self.num_classes)
        state[f"{self.source_head}.bias"] = bias.clone()
        return state
