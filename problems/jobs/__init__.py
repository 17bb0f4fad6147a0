"""The runnable jobs behind ``examples/``: their options, data, run folders and reports.

The example scripts are thin layers over these modules, so that tests and benchmarks
import the same code instead of loading scripts by file path:

* :mod:`problems.jobs.common` — bad-input errors and the run-folder check shared by the jobs;
* the MLO-MAE main job (``examples/mlo_mae_cifar.py``): :mod:`~problems.jobs.mlo_mae_options`
  (command line, presets, settings), :mod:`~problems.jobs.mlo_mae_data` (datasets),
  :mod:`~problems.jobs.mlo_mae_report` (mask statistics, probes, ``summary.json``),
  :mod:`~problems.jobs.mlo_mae_figures` (``masks.png``) and :mod:`~problems.jobs.mlo_mae_job`
  (the graph, training through ``engine.run`` with :mod:`mlo.loggers`, ``main``);
* MetaMAE (``examples/meta_mae.py``): :mod:`~problems.jobs.meta_mae_setup` (configs,
  settings, data, model, graph) and :mod:`~problems.jobs.meta_mae_job` (``main``).

The presets these jobs read are the YAML files in the repository's ``examples/configs/``
(a source checkout, as for every example).
"""
