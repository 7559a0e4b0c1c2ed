"""Constants shared by the public functions, with PyTorch's values."""

import torch

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default
REDUCTIONS = ("none", "mean", "sum")
INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)  # class-index targets
