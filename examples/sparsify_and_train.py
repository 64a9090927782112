"""Sparsify your own model and train it with RigL-ITOP (dynamic sparse training).

The model is an ordinary ``nn.Sequential`` MLP; ``itop.sparsify`` swaps its ``nn.Linear`` layers
for sparse ones (block 32, 10 % of the weights, ERK densities), and a ``TopologyManager`` prunes
and regrows blocks every ``update_every`` steps with RigL's gradient growth. The data is a
synthetic 10-class task (labels from a fixed random teacher network), so the script needs
nothing but torch and itop.

    python examples/sparsify_and_train.py           # a few seconds on a CPU
    python examples/sparsify_and_train.py --tiny    # a handful of steps (what CI runs)
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import itop


def teacher_data(n: int, seed: int, features: int = 256, classes: int = 10) -> TensorDataset:
    """``n`` random inputs ``[n, features]`` (float32) labelled by one fixed random 2-layer net
    (the same teacher for every ``seed``; ``seed`` draws the inputs)."""
    t = torch.Generator().manual_seed(1234)
    w1 = torch.randn(features, 64, generator=t) / features ** 0.5
    w2 = torch.randn(64, classes, generator=t) / 8
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (torch.tanh(x @ w1) @ w2).argmax(dim=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes and a few steps (CI)")
    args = p.parse_args()
    # 256 inputs: at block 32 and these densities every block-row of every layer keeps a block
    # (itop.sparsify warns when a layout leaves rows dead)
    width, n_train, epochs = (512, 512, 2) if args.tiny else (512, 8192, 5)

    torch.manual_seed(0)
    train = DataLoader(teacher_data(n_train, seed=1), batch_size=128, shuffle=True)
    test = teacher_data(2048, seed=2)
    model = nn.Sequential(nn.Linear(256, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))

    # 1. Sparsify: nn.Linear -> itop.SparseLinear, in place. The 10-output head stays dense
    #    (`exclude` takes module names or types; 32 does not divide 10 anyway).
    model = itop.sparsify(model, density=0.1, distribution="erk", block_size=32, exclude=["4"])
    print(itop.sparsity_summary(model))

    # 2. The optimizer is built after sparsify, so it holds the sparse layers' `values`.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

    # 3. RigL-ITOP: every update_every steps drop the weakest blocks and grow as many where the
    #    dense gradient is largest; the rate decays (cosine) to 0 at total_steps.
    total_steps = epochs * len(train)
    mgr = itop.TopologyManager(model, opt, update_every=4 if args.tiny else 20, prune_rate=0.5,
                               growth="gradient", total_steps=total_steps)

    for epoch in range(epochs):
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mgr.step()          # after opt.step(): prunes and regrows on update steps
        with torch.no_grad():
            acc = (model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, accuracy {100 * acc:.1f} %, "
              f"ITOP rate {mgr.itop_rate:.3f}")

    print(mgr.summary())    # per layer: density and the fraction of weights ever explored


if __name__ == "__main__":
    main()
