"""The paper's user-side defense (Section 4): a gated, scaled cosine matching network.

A benign user stops trusting the shared model's decision logic: it keeps only
the embedding f_θ, pulls it towards a fresh random initialisation
(θ' = δθ + (1 − δ)θ_g) to dilute what an attacker planted, and classifies a
query by attention over the episode's own support set. The user then
fine-tunes on that support set alone: first only the per-class gates α_l and
scales β_l (θ' fixed), then θ', α and β jointly. Like `evaluation.FineTune`,
all E episodes run together (`vmap`, or the backend's faster computation of the same function).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from fedmeta import model, portable, reptile
from fedmeta.adam import AdamConfig, AdamState, adam_update
from fedmeta.backend import REFERENCE, Backend
from fedmeta.config import Config, Defense
from fedmeta.errors import FedmetaError
from fedmeta.evaluation import FineTune, Support
from fedmeta.model import Theta

INIT_SCALE = 10.0  # β at the start: cosines in [−1, 1] alone give a nearly uniform softmax
# Adam's β1 in the defense's fine-tuning: matching networks train with standard Adam (Reptile's inner
# loop uses β1 = 0). On 400 meta-test episodes of the attacked `include` model, drawn apart from the
# pipeline's, it gave 93.0 % against 90.9 % with β1 = 0, with backdoor accuracy at the same level.
ADAM_BETA1 = 0.9
NORM_EPS = 1e-8


def glorot_like(theta: Theta, g: torch.Generator) -> Theta:
    """θ_g with `init_conv4`'s scheme for any shapes: Glorot-uniform for every ≥2-D tensor
    (conv and fc weights), 1 for 1-D weights (batch-norm scales), 0 for biases.

    Drawn on the CPU, so one CPU generator gives the same θ_g whatever device θ lives on.
    """
    out: Theta = {}
    for k, p in theta.items():
        if p.dim() >= 2:
            out[k] = model.glorot_(torch.empty(p.shape), g).to(p)
        else:
            out[k] = torch.ones_like(p) if k.endswith("weight") else torch.zeros_like(p)
    return out


def noisy_reinit(theta: Theta, delta: float, g: torch.Generator) -> Theta:
    """θ' = δθ + (1 − δ)θ_g: keeps a fraction δ of the (possibly poisoned) shared model."""
    fresh = glorot_like(theta, g)
    return {k: delta * p + (1 - delta) * fresh[k] for k, p in theta.items()}


def init_head(n_way: int, dim: int, n_episodes: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Theta:
    """Per-episode head: gate logits a [E, N, D] and log β [E, N].

    a = 0 gives α = 0.5 everywhere: cosine ignores a common scale, so this starts as the plain
    (ungated) matching network while the sigmoid sits at its steepest, free to move either way.
    β = exp(log β) stays positive and Adam changes it multiplicatively; it starts at INIT_SCALE.
    """
    return {
        "gate": torch.zeros(n_episodes, n_way, dim, device=device, dtype=dtype),
        "log_scale": torch.full((n_episodes, n_way), math.log(INIT_SCALE), device=device, dtype=dtype),
    }


def gates(head: Theta) -> torch.Tensor:
    """α = sigmoid(a) ∈ [0, 1] by construction, however far training pushes a."""
    return torch.sigmoid(head["gate"])


def scales(head: Theta) -> torch.Tensor:
    return head["log_scale"].exp()


def matching_log_probs(
    f_s: torch.Tensor,
    f_q: torch.Tensor,
    support_y: torch.Tensor,
    head: Theta,
    n_way: int,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """log P(y = l | x̂_q, S) [Q, N] for one episode, from the embeddings f_s = f_θ(x_i) of its support set and
    f_q = f_θ(x̂_q) of its queries.

    score_qi = β_l · cos(α_l ⊙ f(x̂_q), f(x_i)) with l = y_i; attention is a softmax over all support
    examples and P(l) sums the attention on class l (a mixture of one-hot labels), computed as
    logsumexp over the class's scores minus logsumexp over all. Embedded with the support set's batch-norm
    statistics only (as `predict` does), a query's label never depends on other queries.
    exclude [Q, k] (bool): support examples that may not serve as a query's reference (leave-one-out).
    """
    onehot = (support_y[:, None] == torch.arange(n_way, device=support_y.device)).to(f_s.dtype)  # [k, N]
    alpha = gates(head)
    # cos(α_l ⊙ q, s_i) = Σ_d α_ld q_d ŝ_id / ‖α_l ⊙ q‖: per-class gates without a [Q, N, D] tensor.
    num = f_q @ ((onehot @ alpha) * F.normalize(f_s, dim=-1)).T  # [Q, k]
    gated_norm = portable.sqrt((f_q.square() @ alpha.square().T).clamp_min(NORM_EPS**2))  # [Q, N]
    scores = num / (gated_norm @ onehot.T) * (onehot @ scales(head))
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    per_class = torch.where(onehot.T.bool(), scores[:, None, :], float("-inf")).logsumexp(-1)
    return per_class - scores.logsumexp(-1, keepdim=True)


def _leave_one_out_nll(f_s: torch.Tensor, head: Theta, support_y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """NLL of the support examples `idx`, each classified against the rest of the support set (its own
    copy masked), from the support set's embeddings f_s: the queries are support examples."""
    own = idx[:, None] == torch.arange(f_s.shape[0], device=idx.device)
    n_way = head["log_scale"].shape[-1]
    return F.nll_loss(matching_log_probs(f_s, f_s[idx], support_y, head, n_way, own), support_y[idx])


def _leave_one_out_loss(
    theta: Theta, head: Theta, support_x: torch.Tensor, support_y: torch.Tensor, idx: torch.Tensor
) -> torch.Tensor:
    """`_leave_one_out_nll` with batch norm on the support set's statistics, as in prediction."""
    return _leave_one_out_nll(model.embed(theta, support_x), head, support_y, idx)


_head_grad = grad(_leave_one_out_loss, argnums=1)
_joint_grad = grad(_leave_one_out_loss, argnums=(0, 1))


@dataclass
class MatchingState:
    """θ' and head per episode (leading axis E), their Adam states, and fine-tuning steps done so far."""

    theta: Theta
    head: Theta
    theta_adam: AdamState
    head_adam: AdamState
    step: int = 0


@dataclass
class MatchingDefense:
    """The defense as an `evaluation.Learner`.

    reinit=False skips the noisy re-initialisation; use_attention=False replaces the matching head by
    the softmax classifier fine-tuned as in `FineTune` (on θ', support-set batch norm) — the ablations.
    Adam uses `adam` with the defense's own learning rate `cfg.lr` and β1 = ADAM_BETA1.
    """

    queries_independent = True  # batch norm and attention use the support set only

    cfg: Defense
    adam: AdamConfig
    n_way: int
    reinit: bool = True
    use_attention: bool = True
    backend: Backend = REFERENCE

    @classmethod
    def from_params(cls, p: Config, backend: Backend) -> MatchingDefense:
        """Experiment 3's learner as params.yaml sets it: Adam with Reptile's β2 at the defense's rate and
        ADAM_BETA1, computed by `backend` (an Experiment's)."""
        return cls(p.defense, AdamConfig(beta2=p.reptile.beta2), p.evaluation.n_way, backend=backend)

    @property
    def _adam(self) -> AdamConfig:
        return replace(self.adam, lr=self.cfg.lr, beta1=ADAM_BETA1)

    @property
    def _softmax(self) -> FineTune:
        return FineTune(self._adam, "support", self.backend)

    def start(
        self, theta: Theta, n_episodes: int, g: torch.Generator, support: Support | None = None
    ) -> MatchingState | tuple[Theta, AdamState]:
        """θ' per episode (its own θ_g each); the whole model is re-initialised in both modes, so the
        ablations share their draws, then the matching network drops the unused classifier. The head starts the
        same for every episode: `support` is not needed."""
        if self.reinit:
            drawn = [noisy_reinit(theta, self.cfg.delta, g) for _ in range(n_episodes)]
            params = {k: torch.stack([d[k] for d in drawn]) for k in theta}
        else:
            params = reptile.expand(theta, n_episodes)
        if not self.use_attention:
            return params, AdamState.zeros_like(params)
        dim = theta["fc.weight"].shape[1]
        params = {k: p for k, p in params.items() if not k.startswith("fc.")}
        head = init_head(self.n_way, dim, n_episodes, theta["fc.weight"].device, theta["fc.weight"].dtype)
        return MatchingState(params, head, AdamState.zeros_like(params), AdamState.zeros_like(head))

    def train(
        self,
        state: MatchingState | tuple[Theta, AdamState],
        x: torch.Tensor,
        y: torch.Tensor,
        batches: torch.Tensor,
    ) -> MatchingState | tuple[Theta, AdamState]:
        """Matching-network training on the support set: each inner batch is classified against the
        support set with its own copies masked. Steps 1..head_steps move only α and β."""
        if not isinstance(state, MatchingState):
            return self._softmax.train(state, x, y, batches)
        per_class = (y[..., None] == torch.arange(self.n_way, device=y.device)).sum(1)
        if int(per_class.min()) < 2:
            raise FedmetaError(
                "defense: leave-one-out training needs at least 2 support examples per class (k_shot >= 2)"
            )
        adam = self._adam
        result = self.backend.matching_steps(
            state.theta,
            state.head,
            state.theta_adam,
            state.head_adam,
            state.step,
            x,
            y,
            batches,
            self.cfg.head_steps,
            adam,
            _leave_one_out_nll,
        )
        if result is not None:
            return MatchingState(*result, state.step + batches.shape[1])
        theta, head = state.theta, state.head
        for s in range(batches.shape[1]):
            joint = state.step + s >= self.cfg.head_steps
            args = (theta, head, x, y, batches[:, s].to(x.device))
            if joint:
                g_theta, g_head = vmap(_joint_grad)(*args)
                theta = adam_update(theta, g_theta, state.theta_adam, adam)
            else:
                g_head = vmap(_head_grad)(*args)
            head = adam_update(head, g_head, state.head_adam, adam)
        return MatchingState(theta, head, state.theta_adam, state.head_adam, state.step + batches.shape[1])

    def predict(
        self,
        state: MatchingState | tuple[Theta, AdamState],
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        x: torch.Tensor,
    ) -> torch.Tensor:
        """Labels [E, Q]: the most probable class under attention over the whole support set."""
        if not isinstance(state, MatchingState):
            return self._softmax.predict(state, support_x, support_y, x)
        k = support_x.shape[1]
        with torch.no_grad():  # the support set and the queries embedded together, on the support set's statistics
            log_probs = self.backend.on_features(
                lambda t, f, h, sy: matching_log_probs(f[:k], f[k:], sy, h, self.n_way),
                state.theta,
                (support_x, x),
                k,
                state.head,
                support_y,
            )
        return log_probs.argmax(-1)
