"""MLO-MAE on CIFAR-10 — or, offline or without a GPU, on scikit-learn's digits.

Trains one graph of :func:`problems.mlo_mae.build` (masking network above MAE
pretraining above a classifier head; docs/design.md#mlo-mae) step by step, then
evaluates the encoder with a linear probe. From the repository root, after
``pip install -e ".[examples]"``::

    python examples/mlo_mae_cifar.py                     # default: cpu preset (~3 min on 2 cores)
    python examples/mlo_mae_cifar.py --quick             # smoke run (< 1 min), into runs/mlo_mae_quick
    python examples/mlo_mae_cifar.py --preset paper --data-dir ~/data    # the paper's ViT-B/2, GPU
    python examples/mlo_mae_cifar.py --variant mae       # baselines: mae, blo-mae, frozen-mask
    python examples/mlo_mae_cifar.py --method cg         # best-response method of the lower levels
    python examples/mlo_mae_cifar.py --set embed_dim=128 --set depth=4   # any MLOMAESettings field
    python examples/mlo_mae_cifar.py --resume runs/mlo_mae/checkpoint.pt --steps 4000
    python examples/mlo_mae_cifar.py --checkpoint-every 500 --out runs/long   # + runs/long/checkpoints/
    torchrun --nproc_per_node 2 examples/mlo_mae_cifar.py --quick    # data parallel, 2 processes

Under ``torchrun`` every rank builds the same graph and keeps rows ``r, r+W, ...`` of
each global batch of the three data streams (``mlo.distributed.shard_batches``: the
batch size stays the global one and must be divisible by the number of ranks); the
engine averages gradients and hypergradient products over ranks. Rank 0 alone
prints, writes ``metrics.csv``, ``masks.png``, ``summary.json`` and the checkpoint,
and runs the linear probe.

Presets are YAML files in ``examples/configs/`` (``mlo_mae_paper.yaml``,
``mlo_mae_cpu.yaml``; your own with ``--preset-file``). The default preset is
``paper`` when CUDA is available and CIFAR-10 is in the data directory, else
``cpu``. When CIFAR-10 is wanted but absent it is downloaded if the machine is
online (``--download`` to allow it into an explicit ``--data-dir``); otherwise the
run falls back to the ``cpu`` preset, with one line saying so.

Writes to ``--out`` (default ``runs/mlo_mae``; ``runs/mlo_mae_quick`` with ``--quick``, so
that the smoke run never touches the main job's folder): ``metrics.csv`` (a row every 10
iterations: losses, mask hypergradient norm, seconds per problem), ``tb/``
(TensorBoard), ``checkpoint.pt`` (:mod:`mlo.checkpoint`), ``masks.png`` (the
learned masks) and ``summary.json``. A folder that already holds a run (a
``summary.json``, ``checkpoint.pt`` or ``checkpoints/ckpt-*.pt``) is never overwritten
silently: the script stops with ``error: --out DIR already holds a run ...`` (exit 2)
unless ``--overwrite`` is given (which first deletes that run's ``summary.json``,
``checkpoint.pt`` and periodic checkpoints) or ``--resume`` names a checkpoint in that
folder (which continues the run there).

``--checkpoint-every N`` also writes ``checkpoints/ckpt-<iteration>.pt`` under ``--out``
every N iterations (``EngineConfig(checkpoint_every=N)``: atomic; with ``--method
unrolled`` at the first iteration after it with no window open; the newest
``--checkpoint-keep`` (3) kept). Resume from the newest — the highest iteration, also
``mlo.checkpoint.latest("DIR/checkpoints")`` — with ``--resume
DIR/checkpoints/ckpt-<iteration>.pt --out DIR``. The last two lines printed are the trained
classifier head's test accuracy (``stage-II head test accuracy: NN.NN%`` — the paper's
CIFAR "linear probing" numbers, the official code's metric; ``none`` for variants
without a head) and the L-BFGS linear probe's on the frozen encoder,
``linear-probe test accuracy: NN.NN%`` (``summary.json``: ``stage2_head_test_accuracy``,
``linear_probe_test_accuracy``).

``--resume PATH`` rebuilds the same graph (same preset/variant/method/--set), loads
the checkpoint and continues to ``--steps`` iterations in total. Data iterators
restart from their beginning, and the learning-rate schedules are the saved ones
(their length is the original run's ``steps``).

Invalid input prints one line ``error: ...`` on stderr and exits with code 2, before
anything is trained or written: a missing or corrupt checkpoint, a preset with unknown
keys, an explicit ``--data-dir`` without CIFAR-10 for the paper preset; a ``--set`` or
preset value of the wrong type — checked with no coercion, so ``depth=2.7``,
``depth="4"`` and ``cosine="false"`` are refused, ``method`` must name a registered
method and ``method_options`` be a mapping —; ``num_classes`` below the data's classes or
images that do not match ``in_chans``/``image_size``; an ``--out`` that cannot be created;
a preset or ``--set`` value with YAML anchors or aliases (refused unexpanded). CIFAR-10's
pickles are read with a restricted unpickler (dicts, lists, bytes, numbers and numeric
numpy arrays only: a file naming any other global is refused and runs nothing), and each
file's images (uint8 ``[N, 3072]``; float pixels are refused, not cast) and labels (one
per image, in 0..9) are checked first; the error names the file.

The job itself is library code, :mod:`problems.jobs` (options and presets in
``mlo_mae_options``, data in ``mlo_mae_data``, training — ``engine.run`` with
:mod:`mlo.loggers` — and ``main`` in ``mlo_mae_job``, evaluation in ``mlo_mae_report``);
this script is its command line.
"""
from problems.jobs.mlo_mae_job import main

if __name__ == "__main__":
    main(description=__doc__)
