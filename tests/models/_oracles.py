"""Independent oracles shared by the tests (no fedsq_fast code inside)."""
import copy

from torch import nn
import torch


class NaiveDualCopy(nn.Module):
    """FedSQ from two copies of the original model and forward hooks: the eval-mode
    structural copy records float masks at each ReLU/Hardtanh input, the quantitative copy
    multiplies its own pre-activations by them."""

    def __init__(self, model):
        super().__init__()
        self.struct = copy.deepcopy(model).eval()
        for p in self.struct.parameters():
            p.requires_grad_(False)
        self.quant = copy.deepcopy(model)
        self.masks, self.i = [], 0
        for net, hook in ((self.struct, self._record), (self.quant, self._apply)):
            for m in net.modules():
                if isinstance(m, (nn.ReLU, nn.Hardtanh)):
                    m.inplace = False
                    m.register_forward_hook(hook)

    def _record(self, m, inp, out):
        z = inp[0]
        if isinstance(m, nn.Hardtanh):
            self.masks.append((((z > m.min_val) & (z < m.max_val)).float(), (z >= m.max_val).float(),
                               (z <= m.min_val).float()))
        else:
            self.masks.append(((z > 0).float(),))

    def _apply(self, m, inp, out):
        masks = self.masks[self.i]
        self.i += 1
        if isinstance(m, nn.Hardtanh):
            lin, top, low = masks
            return inp[0] * lin + m.max_val * top + m.min_val * low
        return inp[0] * masks[0]

    def train(self, mode=True):
        super().train(mode)
        self.struct.eval()
        return self

    def forward(self, x):
        self.masks, self.i = [], 0
        with torch.no_grad():
            self.struct(x)
        return self.quant(x)
