"""How a benign user's fine-tuning starts its classifier from the shared θ (`evaluation.head`).

The one-shot backdoor lives mostly in the classifier row where the attacker trains its target, so a user that
distrusts the shared classifier can drop it and start its own before fine-tuning; the embedding f_θ is kept:
- `shared`: θ as the server sent it (the paper's user);
- `zero`: weight and bias zero (Ye & Chao, ICLR 2022): every output starts symmetric, with equal logits for any
  input, so no output is favoured before the support set has been seen;
- `prototype`: each class's row from the support set's mean embedding c_k, as Proto-MAML does (Triantafillou et
  al., Meta-Dataset, ICLR 2020): W_k = 2 c_k, b_k = −‖c_k‖². Then W_k·f + b_k = ‖f‖² − ‖f − c_k‖², and ‖f‖² is the
  same for every output, so the head's softmax is the Prototypical Network's softmax over negative squared Euclidean
  distances and its argmax the nearest prototype. No temperature is added: the scale 2 and bias −‖c_k‖² are the only
  ones for which the linear head is exactly that classifier, the one Proto-MAML's head is derived from. The
  prototypes are taken as constants (first order): fine-tuning then trains the head as an ordinary parameter.

Prototypes are embedded as a prediction sees the support set under batch-norm mode `support`: one batch of the
support set, normalised with the support set's own statistics. Everything after this starting point is the paper's
fine-tuning.
"""

from __future__ import annotations

import torch

from fedmeta.backend import REFERENCE, Backend
from fedmeta.config import Head
from fedmeta.model import Theta


def initial(
    params: Theta, rule: Head, support_x: torch.Tensor, support_y: torch.Tensor, backend: Backend = REFERENCE
) -> Theta:
    """Per-episode weights (leading axis E) with the classifier set by `rule`; `shared` returns `params` itself.

    support_x [E, k, C, H, W] and support_y [E, k] are each episode's support set, holding every class."""
    if rule == "shared":
        return params
    weight, bias = params["fc.weight"], params["fc.bias"]  # [E, N, D], [E, N]
    if rule == "zero":
        return {**params, "fc.weight": torch.zeros_like(weight), "fc.bias": torch.zeros_like(bias)}
    with torch.no_grad():
        features = backend.on_features(lambda p, f: f, params, (support_x,), support_x.shape[1])  # [E, k, D]
        onehot = (support_y[..., None] == torch.arange(weight.shape[1], device=support_y.device)).to(features.dtype)
        prototypes = onehot.transpose(1, 2) @ features / onehot.sum(1)[..., None]  # [E, N, D]
    return {**params, "fc.weight": 2 * prototypes, "fc.bias": -prototypes.square().sum(-1)}
