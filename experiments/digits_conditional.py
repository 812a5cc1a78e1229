"""Conditional generation on the 8x8 digits: classifier-free guidance and inpainting.

Trains configs/ddpm/digits_conditional.py (a class-conditional U-Net whose
labels are dropped to the null label 10 % of the time), or reuses the
trained work directory given by --workdir. Then, with the EMA parameters and
ancestral sampling (1000 steps):

* guidance: 10 samples of each digit at guidance weights w = 0, 1 and 3
  (score (1 + w) s(x, y) - w s(x, null)), each judged by a logistic-regression
  classifier fitted to the training digits (scikit-learn, 97 % accurate on
  the held-out digits): the fraction of samples classified as their label;
* inpainting: the lower half of 10 held-out digits filled in with the
  unconditional score (the null label) and the score SDE paper's projection
  (`samplers.inpainting`), next to the originals.

Writes results/digits_conditional.{png,csv,md}; the last output line is a
JSON object.

    python experiments/digits_conditional.py [--steps 6000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusers_unified import samplers
from diffusers_unified.experiment import train
from diffusers_unified.experiment.figures import image_grid
from diffusers_unified.experiment.run import build_run, restore
from diffusers_unified.experiment.workdir import Workdir

from common import RESULTS, final_json, write_table

WEIGHTS = (0.0, 1.0, 3.0)
PER_CLASS = 10


def classifier(run):
    """Logistic regression on the training digits, in the model's pixel scale."""
    from sklearn.linear_model import LogisticRegression

    x, y = run.dataset.model_data("train")
    x_test, y_test = run.dataset.model_data("test")
    flat = lambda a: np.asarray(a).reshape(len(a), -1)
    clf = LogisticRegression(max_iter=2_000).fit(flat(x), np.asarray(y))
    return clf, float(clf.score(flat(x_test), np.asarray(y_test))), flat


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6_000, help="training updates")
    parser.add_argument("--workdir", default="", help="a trained (or to be trained) work dir")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--num_steps", type=int, default=1_000, help="ancestral sampling steps")
    args = parser.parse_args()

    from configs.ddpm.digits_conditional import get_config

    config = get_config()
    config.training.n_iters = args.steps
    config.training.checkpoint_freq = args.steps
    config.training.snapshot_freq = 0
    workdir = args.workdir or tempfile.mkdtemp(prefix="digits_conditional_")
    start = time.perf_counter()
    train.train(config, workdir)
    train_seconds = time.perf_counter() - start
    run = build_run(config)
    _, state = restore(run, Workdir(workdir))
    params, process = state.ema_params, run.process
    shape = (PER_CLASS * 10, *run.data_shape)
    labels = jnp.repeat(jnp.arange(10, dtype=jnp.int32), PER_CLASS)
    clf, clf_accuracy, flat = classifier(run)

    rows, panels, headline = [], [], {"classifier_test_accuracy": clf_accuracy}
    for w in WEIGHTS:
        score_fn = run.score_fn(params, labels, w if w > 0 else None)
        out = samplers.ancestral(
            jax.random.PRNGKey(1), score_fn, process, shape, num_steps=args.num_steps
        )
        x = np.asarray(out.samples)
        hits = clf.predict(flat(x)) == np.asarray(labels)
        per_class = hits.reshape(10, PER_CLASS).mean(1)
        rows.append([f"guidance w={w:g}", float(hits.mean()), float(per_class.min())])
        headline[f"accuracy w={w:g}"] = float(hits.mean())
        panels.append((f"w = {w:g} (rows: digits 0-9)", x))

    # Inpainting: rows 4-7 of 10 held-out digits, from the unconditional score.
    x_test = np.asarray(run.dataset.model_data("test")[0][:10])
    mask = np.zeros_like(x_test, bool)
    mask[:, :4] = True  # the upper half is known
    null = jnp.full((10,), run.dataset.num_classes, jnp.int32)
    project = samplers.inpainting(process, x_test, mask)
    out = samplers.ancestral(
        jax.random.PRNGKey(2),
        run.score_fn(params, null),
        process,
        x_test.shape,
        num_steps=args.num_steps,
        project=project,
    )
    filled = np.asarray(out.samples)
    np.testing.assert_allclose(filled[mask], x_test[mask], atol=1e-5)  # the known half is kept
    error = float(np.sqrt(np.mean((filled[~mask] - x_test[~mask]) ** 2)))
    masked = np.where(mask, x_test, -1.0)
    rows.append(["inpainting (lower half), RMS error of filled pixels", error, None])
    headline["inpainting_rms_error"] = error
    both = np.concatenate([x_test, masked, filled])
    panels.append(("inpainting: original / known half / filled", both))

    os.makedirs(args.out, exist_ok=True)
    figure(panels, run.dataset.scaling, os.path.join(args.out, "digits_conditional.png"))
    write_table(
        "digits_conditional",
        ["setting", "classified as its label (or RMS error)", "worst class"],
        rows,
        args.out,
        note=(
            f"{args.steps} updates ({train_seconds:.0f} s with start-up); classifier: logistic "
            f"regression on the training digits, {clf_accuracy:.3f} accurate on the held-out "
            "ones. Pixel values in [-1, 1]."
        ),
    )
    final_json(headline)


def figure(panels, scaling, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4))
    for ax, (title, x) in zip(axes, panels, strict=True):
        ax.imshow(image_grid(scaling.to_uint8(x), columns=10)[..., 0], cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
