"""Stage pretrain: benign federated Reptile from scratch (round 0 of the paper's experiments).

Variant 'exclude' keeps backdoor classes out of benign data (scenario a),
'include' gives them, correctly labelled, to their owners (scenarios b, c).
"""

from __future__ import annotations

from fedmeta import checkpoint, figures, model, runtime, tracking
from fedmeta.experiment import Experiment, flat


def main(variant: str) -> None:
    with runtime.stage("pretrain", variant=variant) as (params, run):
        exp = Experiment.from_prepared(params)
        b, include = params.budget, variant == "include"
        fingerprint = checkpoint.fingerprint(params.model_dump_json(), runtime.PREPARED)
        resume = checkpoint.Resume(runtime.STATE / f"pretrain_{variant}.pt", b.checkpoint_every, fingerprint)
        saved = resume.restore(exp.device)
        if saved is None:
            channels, side = exp.images.shape[1], exp.images.shape[-1]
            theta = model.init_conv4(channels, b.width, side, params.reptile.n_way, exp.gen("init"))
            theta = {k: v.to(exp.device) for k, v in theta.items()}
            start, rows = 0, []
        else:
            theta, start, rows = saved["theta"], saved["done"], saved["rows"]
        learner = exp.finetuner()
        for rnd in runtime.progress(
            range(start, b.pretrain_rounds), f"pretrain {variant}", start=start, total=b.pretrain_rounds
        ):
            theta = exp.round(theta, rnd, include, pretraining=True)
            done = rnd + 1
            if done % b.pretrain_eval_every == 0 or done == b.pretrain_rounds:
                point = flat(exp.meta_test(theta, learner, [params.evaluation.steps], "pretrain")[0])
                rows.append({"round": done, **point})
                run.metrics(tracking.quantities(point), step=done)
            resume.save(done, {"theta": theta, "rows": rows})
        checkpoint.save(runtime.CHECKPOINTS / f"pretrain_{variant}.pt", {"theta": theta, "round": b.pretrain_rounds})
        runtime.write_csv(runtime.METRICS / f"pretrain_{variant}.csv", rows)
        runtime.write_json(runtime.METRICS / f"pretrain_{variant}.json", rows[-1])
        title = f"benign pretraining on {figures.DATASET_NAMES[params.dataset]} ({variant} backdoor classes)"
        run.artifact(figures.pretraining(rows, runtime.CURVES / f"pretrain_{variant}.png", title))
        for path in (
            runtime.METRICS / f"pretrain_{variant}.csv",
            runtime.METRICS / f"pretrain_{variant}.json",
            runtime.CHECKPOINTS / f"pretrain_{variant}.pt",
        ):
            run.artifact(path)
        resume.finish()
