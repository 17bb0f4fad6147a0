"""Linear probe and fine-tuning on synthetic data with known answers."""
import torch
from torch import nn

from problems.evaluation import Features, extract_features, finetune, linear_probe


def _separable(n, d=10, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 6.0 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    x = centers[y] + torch.randn(n, d, generator=g)
    return x, y


def test_probe_separable_features_high_accuracy():
    x, y = _separable(600)
    r = linear_probe(lambda t: t, (x[:400], y[:400]), (x[400:], y[400:]))
    assert r.accuracy > 0.97 and r.train_accuracy > 0.97 and r.num_features == 10


def test_probe_noise_features_near_chance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 20, generator=g)
    y = torch.randint(0, 4, (2000,), generator=g)
    r = linear_probe(lambda t: t, (x[:1000], y[:1000]), (x[1000:], y[1000:]))
    assert abs(r.accuracy - 0.25) < 0.06


def test_probe_deterministic_no_grad_and_eval_mode():
    x, y = _separable(300)
    net = nn.Sequential(nn.Linear(10, 16), nn.Dropout(0.5), nn.ReLU())
    net.train()
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), m.training)))
    a = linear_probe(net, (x[:200], y[:200]), (x[200:], y[200:]))
    b = linear_probe(net, (x[:200], y[:200]), (x[200:], y[200:]))
    assert seen and not any(grad or training for grad, training in seen)  # no grad, eval mode
    assert net.training  # mode restored
    assert a == b and a.accuracy > 0.9
    h = extract_features(net, x[:5])
    assert h.shape == (5, 16) and not h.requires_grad


class _Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 32), nn.GELU())

    def features(self, x, pool="cls"):
        return self.body(x)


def test_finetune_trains_encoder_and_head():
    torch.manual_seed(0)
    x, y = _separable(600)
    enc = _Enc()
    before = enc.body[0].weight.detach().clone()
    r = finetune(Features(enc), nn.Linear(32, 3), (x[:400], y[:400]), (x[400:], y[400:]),
                 epochs=5, lr=1e-2, batch_size=32)
    assert r.accuracy > 0.95 and r.steps == 5 * (400 // 32)
    assert not torch.equal(before, enc.body[0].weight)  # full fine-tuning, not a frozen probe
