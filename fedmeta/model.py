"""Conv4 as a pure function of its weights θ (a `Theta`, name → tensor).

Keeping the model functional (no nn.Module state) lets every inner loop run
many episodes at once under `torch.func.vmap`, and makes batch norm use the
statistics of each episode's own batch, as Reptile's reference does.

This is the readable definition, differentiated by autograd. `fedmeta.fast`
computes the same function faster (the hand-written gradient, episodes on
lanes or stacked into one network); the research code never needs to know
which ran.
"""

import math

import torch
import torch.nn.functional as F

Theta = dict[str, torch.Tensor]

BN_EPS = 1e-5
BLOCKS = 4
EMBEDDING_KEYS = frozenset(
    [f"conv{i}.weight" for i in range(BLOCKS)] + [f"bn{i}.{n}" for i in range(BLOCKS) for n in ("weight", "bias")]
)
CONV4_KEYS = EMBEDDING_KEYS | {"fc.weight", "fc.bias"}


def feature_size(image_size: int) -> int:
    """Spatial side after four 2×2 max-pools (28 → 1, 84 → 5)."""
    side = image_size
    for _ in range(BLOCKS):
        side //= 2
    return side


def glorot_(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Glorot-uniform in place; the paper's defense re-initialises with it."""
    fan_out, fan_in = t.shape[0], t.shape[1]
    receptive = t[0][0].numel() if t.dim() > 2 else 1
    bound = math.sqrt(6.0 / ((fan_in + fan_out) * receptive))
    return t.uniform_(-bound, bound, generator=generator)


def init_conv4(channels: int, width: int, image_size: int, n_way: int, generator: torch.Generator) -> Theta:
    """Glorot-initialised Conv4: 4 × (3×3 conv, BN, ReLU, 2×2 max-pool), then a linear classifier.

    Convolutions carry no bias: batch norm cancels it, and Adam would turn its
    round-off gradients into full-size random steps.
    """
    theta: Theta = {}
    c_in = channels
    for i in range(BLOCKS):
        theta[f"conv{i}.weight"] = glorot_(torch.empty(width, c_in, 3, 3), generator)
        theta[f"bn{i}.weight"] = torch.ones(width)
        theta[f"bn{i}.bias"] = torch.zeros(width)
        c_in = width
    n_features = width * feature_size(image_size) ** 2
    theta["fc.weight"] = glorot_(torch.empty(n_way, n_features), generator)
    theta["fc.bias"] = torch.zeros(n_way)
    return theta


def batch_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, n_ref: int | None) -> torch.Tensor:
    """Training-mode BN; with `n_ref`, statistics come from the first `n_ref` samples only.

    Their variance is taken in two passes (mean, then mean squared deviation): torch.var_mean over
    (0, 2, 3) runs much slower on the CPU.
    """
    if n_ref is None:
        return F.batch_norm(h, None, None, weight, bias, training=True, eps=BN_EPS)
    ref = h[:n_ref]
    mean = ref.mean((0, 2, 3), keepdim=True)
    var = (ref - mean).square().mean((0, 2, 3), keepdim=True)
    scale = torch.rsqrt(var + BN_EPS) * weight[:, None, None]
    return torch.addcmul(bias[:, None, None] - mean * scale, h, scale)  # one full-size result, not four


def embed(theta: Theta, x: torch.Tensor, n_ref: int | None = None) -> torch.Tensor:
    """f_θ(x): the flattened output of the four conv blocks (the network without its classifier)."""
    h = x
    for i in range(BLOCKS):
        h = F.conv2d(h, theta[f"conv{i}.weight"], padding=1)
        h = batch_norm(h, theta[f"bn{i}.weight"], theta[f"bn{i}.bias"], n_ref)
        h = F.max_pool2d(F.relu(h), 2)
    return h.flatten(1)


def classifier(theta: Theta, features: torch.Tensor) -> torch.Tensor:
    """The linear classifier on f_θ(x)."""
    return F.linear(features, theta["fc.weight"], theta["fc.bias"])


def logits(theta: Theta, x: torch.Tensor, n_ref: int | None = None) -> torch.Tensor:
    return classifier(theta, embed(theta, x, n_ref))


def loss(theta: Theta, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits(theta, x), y)
