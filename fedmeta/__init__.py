"""fedmeta: backdoor attacks and defenses in federated meta-learning (Chen, Golubchik, Paolieri)."""
