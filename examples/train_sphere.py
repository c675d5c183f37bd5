"""Train a small model through a declarative node.

The model is ``x ↦ argmin_u ½‖u − Wx‖²  s.t.  ‖u‖² = 1`` with a learnable linear map ``W``:
the projection onto the unit sphere is written declaratively (objective + constraint +
any solver) and its gradient comes from implicit differentiation (Prop. 4.5). The
targets are ``normalize(M x)`` for a hidden ``M``, so the loss should fall to ~0.

Run: ``python examples/train_sphere.py``.
"""

from __future__ import annotations

import torch

import declnet


class SphereProjection(declnet.EqualityConstrainedNode):
    """y = argmin_u ½‖u − z‖² subject to ‖u‖² = 1, for z of shape (B, m)."""

    def objective(self, z, *, y):
        return 0.5 * ((y - z) ** 2).sum(-1)

    def equality_constraints(self, z, *, y):
        return (y**2).sum(-1, keepdim=True) - 1.0

    def solve(self, z):
        return z / z.norm(dim=-1, keepdim=True)


def main() -> None:
    torch.manual_seed(0)
    n, m = 8, 5
    hidden = torch.randn(m, n)
    x_train = torch.randn(512, n)
    y_train = torch.nn.functional.normalize(x_train @ hidden.T, dim=-1)

    model = torch.nn.Sequential(torch.nn.Linear(n, m, bias=False), SphereProjection())
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for epoch in range(1, 31):
        for batch in torch.randperm(512).split(64):
            loss = ((model(x_train[batch]) - y_train[batch]) ** 2).sum(-1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if epoch % 5 == 0:
            with torch.no_grad():
                full = ((model(x_train) - y_train) ** 2).sum(-1).mean()
            print(f"epoch {epoch:2d}  training loss {full:.5f}")
    cosine = (model(x_train) * y_train).sum(-1).mean()
    print(f"mean cosine similarity to the targets: {cosine:.4f}")


if __name__ == "__main__":
    main()
