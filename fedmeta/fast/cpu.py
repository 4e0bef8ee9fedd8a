"""The "lanes" inner loops (the CPU default): each episode's steps on one lane with the hand-written gradient.

On the CPU, `vmap` turns per-episode weights into grouped convolutions, which are slow there, and autograd's
bookkeeping dominates a step of a small episode. Here each episode is an ordinary single-model computation
(`conv4`, scripted), its steps spread evenly over the lanes (`lanes.run_chains`), and Adam updates that episode's
rows of the stacked tensors in place. Every step of an episode runs on one thread, so the lane count cannot change
a bit.
"""

from __future__ import annotations

import torch

from fedmeta.adam import AdamConfig, AdamState
from fedmeta.backend import HeadLoss
from fedmeta.fast import conv4, lanes
from fedmeta.model import Theta


def adapt(
    theta: Theta, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, cfg: AdamConfig, state: AdamState
) -> tuple[Theta, AdamState]:
    """Each episode's steps with `conv4.loss_grad` and an in-place `_foreach` Adam on its rows of the
    stacked tensors, as one TorchScript call per lane's run of steps (`conv4.compiled().episode_steps`)."""
    keys = list(theta)
    n_ep, steps = x.shape[0], batches.shape[1]
    if steps == 0:
        return theta, state
    batches = batches.to(x.device)
    with torch.no_grad():
        out = {k: theta[k].clone() for k in keys}
        v = {k: state.v[k].clone() for k in keys}
        # with β1 = 0 the first moment is the gradient: each episode's last one is written here at its end
        m = {k: state.m[k].clone() if cfg.beta1 != 0 else torch.empty_like(state.m[k]) for k in keys}
    moments: dict[int, conv4.Moments] = {}  # per episode, computed by the lane that runs its first steps
    episode_steps = conv4.compiled().episode_steps  # compiled here, before the lanes start

    def do(j: int, first: int, end: int) -> None:
        p_j, v_j = [out[k][j] for k in keys], [v[k][j] for k in keys]
        m_j = [m[k][j] for k in keys] if cfg.beta1 != 0 else []
        with torch.no_grad():
            if j not in moments:  # a cut episode's last steps run after its first (lanes.run_chains)
                moments[j] = conv4.patch_moments(x[j])
            gram, colsum = moments[j]
            m_j = episode_steps(
                keys,
                p_j,
                m_j,
                v_j,
                x[j],
                y[j],
                batches[j],
                gram,
                colsum,
                first,
                end,
                state.step,
                cfg.lr,
                cfg.beta1,
                cfg.beta2,
                cfg.eps,
            )
            if cfg.beta1 == 0 and end == steps:
                torch._foreach_copy_([m[k][j] for k in keys], m_j)

    lanes.run_chains(n_ep, steps, do)
    state.m, state.v = m, v
    state.step += steps
    return out, state


def _support_moments(support_x: torch.Tensor) -> conv4.Moments:
    gram, colsum = conv4.patch_moments(support_x)
    return gram.sum(0), colsum.sum(0)


def _head_grads(
    nll: HeadLoss, feat: torch.Tensor, head: Theta, support_y: torch.Tensor, idx: torch.Tensor, joint: bool
) -> tuple[Theta, torch.Tensor | None]:
    """Autograd through the small matching head only: the head's gradients, and the embeddings' when `joint`."""
    f = feat.detach().requires_grad_(joint)
    leaves = {k: v.detach().requires_grad_() for k, v in head.items()}
    with torch.enable_grad():
        loss = nll(f, leaves, support_y, idx)
        out = torch.autograd.grad(loss, [*leaves.values(), f] if joint else list(leaves.values()))
    return dict(zip(leaves, out)), (out[-1] if joint else None)


def matching_steps(
    theta: Theta,
    head: Theta,
    theta_adam: AdamState,
    head_adam: AdamState,
    done: int,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: torch.Tensor,
    head_steps: int,
    adam: AdamConfig,
    nll: HeadLoss,
) -> tuple[Theta, Theta, AdamState, AdamState]:
    """The defense's fine-tuning: each episode's steps on one lane, the embedding's gradient by hand
    (`conv4.compiled()`), autograd only through the head (`nll`), Adam in place on
    the episode's rows. While θ' is fixed (steps before `head_steps`, counting the `done` ones) an episode's support
    embeddings are computed once per run of steps, not once per step."""
    steps = batches.shape[1]
    batches = batches.to(x.device)
    with torch.no_grad():
        theta, head = ({k: v.clone() for k, v in d.items()} for d in (theta, head))
        theta_adam, head_adam = theta_adam.clone(), head_adam.clone()
    first_joint = min(steps, max(0, head_steps - done))  # this call's first step that trains θ'
    moments: dict[int, conv4.Moments] = {}  # per episode, computed by the lane that runs its first steps
    scripted = conv4.compiled()  # compiled here, before the lanes start

    def step_(params: Theta, grads: Theta, m: Theta, v: Theta, j: int, step: int) -> None:
        """Adam in place on episode j's rows of params, m and v."""
        keys = list(params)
        conv4.adam_(
            [params[k][j] for k in keys],
            [grads[k] for k in keys],
            [m[k][j] for k in keys],
            [v[k][j] for k in keys],
            step,
            adam.lr,
            adam.beta1,
            adam.beta2,
            adam.eps,
        )

    def do(j: int, first: int, end: int) -> None:
        th = {k: v[j] for k, v in theta.items()}
        feat: torch.Tensor | None = None
        with torch.no_grad():
            if j not in moments:  # a cut episode's last steps run after its first (lanes.run_chains)
                moments[j] = _support_moments(x[j])
            for s in range(first, end):
                joint = s >= first_joint
                if joint or feat is None:
                    feat, tape = scripted.features_forward(th, x[j], moments[j])
                g_head, g_feat = _head_grads(nll, feat, {k: v[j] for k, v in head.items()}, y[j], batches[j, s], joint)
                if g_feat is not None:
                    g_theta = scripted.features_backward(th, tape, g_feat)
                    step_(theta, g_theta, theta_adam.m, theta_adam.v, j, theta_adam.step + s - first_joint + 1)
                step_(head, g_head, head_adam.m, head_adam.v, j, head_adam.step + s + 1)

    lanes.run_chains(x.shape[0], steps, do)
    theta_adam.step += steps - first_joint
    head_adam.step += steps
    return theta, head, theta_adam, head_adam
