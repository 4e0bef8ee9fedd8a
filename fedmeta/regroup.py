"""Experiment 4's larger federation: the prepared data dealt among more users.

A larger federation deals the same benign classes among more users, exactly as `splits.split` would
have dealt them with that many users, so only who holds what changes, never the images or the attack
sets. Every run starts from the M = 4 pretrained models (a documented deviation: pretraining again
for each federation and rule would cost more than the rest of the pipeline).
"""

from __future__ import annotations

from dataclasses import replace

from fedmeta.splits import FederatedData


def regroup(data: FederatedData, users: int, attacker: int) -> FederatedData:
    """The prepared benign classes dealt among `users` (class i to user i mod users, as the split deals
    them), and the attack classes' owners among the benign users in the split's order."""
    old = data.user_classes
    benign_classes = [old[i % len(old)][i // len(old)] for i in range(sum(len(c) for c in old))]
    benign_users = [u for u in range(users) if u != attacker]
    owners = [benign_users[i % len(benign_users)] for i in range(len(data.attack_owner))]
    return replace(data, user_classes=[benign_classes[u::users] for u in range(users)], attack_owner=owners)
