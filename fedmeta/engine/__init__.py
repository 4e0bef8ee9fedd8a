"""Where federated rounds run: in this process (`local`, Experiment.round's own loop) or through Flower.

`plan` holds what both engines share (selection, aggregation), `flower` the
ServerApp, `client` the ClientApps, `worker` the per-user trainer they hand
θ to, `deployment` the SuperLink, SuperNodes and workers of one machine (or
only `flwr run` against a running SuperLink), `node` one user's SuperNode and
worker on a machine of its own, `processes` their supervision. See
docs/flower.md.
"""
