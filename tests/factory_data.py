"""Datasets for ``--dataset factory_data:NAME`` (the tests put this folder on ``sys.path``)."""

from __future__ import annotations

import torch
from PIL import Image


class Squares(torch.utils.data.Dataset):
    """A user's dataset: 3x16x16 uint8 images, label = whether a bright square sits in the left or the right half."""

    classes = ("left", "right")

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 60, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
        self.targets = torch.randint(0, 2, (n,), generator=g).tolist()
        for image, label in zip(self.images, self.targets):
            image[:, 6:10, 1 + 8 * label:6 + 8 * label] = 250

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], self.targets[i]


def squares(split: str) -> Squares:
    return Squares(96 if split == "train" else 32, seed=0 if split == "train" else 1)


class Photos(torch.utils.data.Dataset):
    """PIL images of varied sizes and no ``targets``: labels only by reading."""

    classes = 2

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.new("RGB", (20 + i, 16), (200, 30, 30) if i % 2 else (20, 40, 220)), i % 2


def photos(split: str) -> Photos:
    return Photos()


def no_classes(split: str) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
