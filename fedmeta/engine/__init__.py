"""Where federated rounds run: in this process (`local`, Experiment.round's own loop) or through Flower.

`plan` holds what both engines share (selection, aggregation), `flower` the
ServerApp and ClientApp, `deployment` the SuperLink and SuperNodes of one
machine, `processes` their supervision. See docs/flower.md.
"""
