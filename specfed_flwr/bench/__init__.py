"""``specfed-flwr bench``: every measurement of BENCHMARKS.md, side by side in one process.

One run loads the pair once and measures, on the shipped prompt set:

* **sweeps** (in-process engine, sampling at temperature 1), one axis at a time around the base
  configuration K=8, gamma=4, reconstruction=exact, 2 clients, 1 concurrent sequence:
  K, reconstruction rule (for both draft-sampling modes), gamma, clients, concurrency;
* **fixed prefixes** (paired, no sampling noise): alpha = sum_x min(p, q_hat) and the kept mass
  S for every K and rule, and the exact one-step output law of each scheme -> TV to the target;
  a Monte Carlo run of the engine's own sparsify -> reconstruct -> select -> verify functions at
  one prefix checks that law;
* **engines** (greedy, same prompts, interleaved repetitions, medians): target-only
  ``generate``, transformers' assisted generation with the same pair, the in-process engine
  (1 and 2 clients), batched vs per-sequence verification, the Flower simulation engine
  (``run_simulation`` with ``serve.make_server_app`` and ``client_app.app``) with its per-round
  overhead, and the deployment engine (``launch.start_deployment_stack``, 2 SuperNodes, ``flwr run``)
  with the persistent device runtime and with Flower's stock process-per-message path side by side
  (median strict-round time and median gap between a node's consecutive replies);
* **modeled latency** per link profile for top-K vs full-distribution transmission vs
  target-only, and the Lambert-W gamma* (``theory.optimal_gamma``) against the measured best.

It writes ``<out-dir>/results.json`` (a list of records), ``<out-dir>/analysis.json``,
PNG plots in ``<out-dir>`` and regenerates the markdown report (``--markdown``).

Modules, in the order a run uses them:

* ``cli``: the command line (``specfed-flwr bench``, ``python -m specfed_flwr.bench``);
* ``presets``: the base configuration, the presets, the required record keys;
* ``workload``: the model pair and the prompts; ``machine``: what it ran on;
* ``suite``: the run's state (``Bench``) and the order of the jobs;
* ``jobs_engines``, ``jobs_prefixes``, ``jobs_sweeps``, ``jobs_theory``, ``jobs_federation``: the jobs;
* ``run_local`` (HF ``generate``, in-process engine), ``run_flower`` (simulation, deployment): the
  runners, each returning one record's numbers; ``rounds``: the per-round numbers of a run, read
  from its ``RoundReport``s; ``federation``, ``stepcost``: the pipelined-engine comparison and the
  step costs;
* ``law`` (fixed-prefix output law), ``latency`` (link model, gamma* fit): the maths;
* ``verdicts``: the targets judged on the run's numbers;
* ``output`` (files, saved state), ``plots``, ``report`` + ``report_*`` (BENCHMARKS.md).
"""
