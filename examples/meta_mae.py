"""MetaMAE (and its Table-4 ablations) on four modalities, then a linear probe.

Pretrains a small MAE with MetaMAE's objective — latent adaptation on the Nearby-S
support, query reconstruction from the adapted latent, λ · task contrast — run by
:class:`mlo.Engine`, then fits a logistic-regression probe on the frozen encoder's
mean-pooled features (``mae.features(x, pool="mean")``) and reports test accuracy.

Two forms of the same objective (``--form``): ``graph`` (default) is the problem graph
of :func:`problems.meta_mae.build_graph` — the per-sample latents ``Z`` are a lower
``mlo.WindowProblem`` opened from the encoder on each batch and adapted by the
engine's unrolled SGD, the MAE + projector the upper problem; ``single`` is one
:class:`mlo.Problem` (:class:`problems.meta_mae.MetaMAEPretrain`) whose loss writes
the inner step itself (``problems.latent_adaptation.metamae_loss``)::

    python examples/meta_mae.py --modality image          # digits       (cpu preset, ~1 min on one core)
    python examples/meta_mae.py --modality image --config examples/configs/meta_mae_fmnist.yaml --out runs/meta_mae/image_fmnist
                                                          # Fashion-MNIST (~2-4 min on one core)
    python examples/meta_mae.py --modality tabular        # breast cancer
    python examples/meta_mae.py --modality timeseries     # aeon BasicMotions
    python examples/meta_mae.py --modality tokens         # CMU-dict spellings -> syllables
    python examples/meta_mae.py --modality image --quick  # smoke run (seconds)
    python examples/meta_mae.py --modality image --variant mae --decoder-depth 0   # MAE, linear decoder
    python examples/meta_mae.py --modality image --no-contrastive                  # + latent adaptation
    python examples/meta_mae.py --modality tabular --support-ratio 0.5 --first-order
    python examples/meta_mae.py --modality image --form single                     # one-problem form
    python examples/meta_mae.py --modality image --set mask_ratio=0.6 --set depth=4   # any setting

Presets are YAML files ``examples/configs/meta_mae_<modality>.yaml`` with the
paper's hyperparameters (Table 8: α, λ, decoder depth, mask ratio, batch; τ = 0.5,
r = 0.1, one inner step) under ``paper`` (the paper's 256-d × 12 encoder: a GPU
model) and CPU-sized overrides under ``cpu`` (the default). ``--config FILE`` reads
your own. The ``paper`` blocks also follow the official code (alinlab/MetaMAE) where the
paper is silent: no dropout in the decoder (``decoder_dropout: 0``, also Table 7), no
QKV bias (``qkv_bias: false``), dropout on the encoder's input tokens at the encoder's
rate (``input_dropout``); the tabular preset embeds features with one shared
``Linear(1, D)`` (``tokenizer: {embedding: shared}``; ``--tabular-embedding per_feature``
for one embedding per feature). The ``cpu`` blocks keep ``qkv_bias: true`` and
``input_dropout: 0`` (the settings of the measured rows in docs/meta_mae.md).

Ablations (Table 4 / Table 6): ``--variant mae`` (no adaptation, no contrast: the
MAE loss), ``--no-adapt``, ``--no-contrastive``, ``--decoder-depth 0`` (linear
decoder), ``--support-ratio r``, ``--first-order``; ``--alpha``, ``--lam`` override
the preset's α and λ.

Writes ``--out`` (default ``runs/meta_mae/<modality>``, ``runs/meta_mae_quick/<modality>``
with ``--quick``): ``metrics.csv`` (one row per iteration: loss, query and contrastive
terms, seconds; :class:`mlo.loggers.CSVLogger`) and ``summary.json``; with
``--checkpoint-every N`` also ``checkpoints/ckpt-<iteration>.pt`` every N engine
iterations (``EngineConfig(checkpoint_every=N)``: atomic, the newest ``--checkpoint-keep``
kept; load one with ``mlo.checkpoint.load`` into the same graph — this script has no
``--resume``). A folder that already holds a run (a ``summary.json`` or periodic
checkpoints) is never overwritten silently — e.g. two ablations of one modality, which
share the default folder: the script stops with ``error: --out DIR already holds a run
...`` (exit 2) unless ``--overwrite`` is given (which first deletes that run's
``summary.json`` and checkpoints) or another ``--out``. Also
probes the randomly initialised encoder and the raw input (one-hot ids for tokens)
unless ``--no-floors``. The last line printed is ``linear-probe test accuracy: NN.NN%``.

``--set KEY=VALUE`` overrides any setting of the config (the value read as YAML); the
dedicated switches (``--alpha``, ``--lam``, ...) win over it. Every setting — from the
config, ``--set`` or a switch — is checked against its type and range with no coercion
(``depth: 2.7``, ``cosine: "false"``, ``--alpha nan``, ``--lam -1``, ``mask_ratio: 1.5``,
``heads: 0`` are refused, as are configs with YAML anchors or aliases and an ``--out``
that cannot be created): one line ``error: ...`` naming the source, the setting, the value
and what is expected, exit code 2, nothing written.

The job is library code: :mod:`problems.jobs.meta_mae_setup` (configs, settings, data,
model, graph) and :mod:`problems.jobs.meta_mae_job` (``main``); this script is its
command line.
"""
from problems.jobs.meta_mae_job import main

if __name__ == "__main__":
    main(description=__doc__)
