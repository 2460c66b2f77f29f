"""The one layer of our own: a residual block, main(x) + shortcut(x).

Everything else in a model is a plain torch.nn layer. The ReLU after the sum is an ordinary nn.ReLU that
follows the block in the enclosing nn.Sequential, so bound propagation treats the block as an addition of
two sequential branches and nothing more.
"""
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, main: nn.Sequential, shortcut: nn.Sequential | None = None):
        super().__init__()
        self.main = main
        self.shortcut = shortcut if shortcut is not None else nn.Sequential()  # empty = identity

    def forward(self, x):
        return self.main(x) + self.shortcut(x)
