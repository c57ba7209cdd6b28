"""Measurements of a machine and of plait's own runs, with torch and torch.distributed.

- `calibrate.py`: the matmul rate, memory-bound kernel bandwidth and links of this machine, written
  as a cluster profile (`plait plan --calibrate`, and `parallel.auto` at start-up without one);
- `overhead.py`: the host time plait's tensor-parallel and FSDP2 wrappers add per call (part of
  the calibration on a CPU);
- `step_time.py`: seconds per step of layouts trained for a few steps, and the rank correlation
  with the planner's predictions (bench/planner_ranking.py and its test);
- `comm_counter.py`: the bytes every collective moves, per rank (tests and bench/).

None of it runs during training. It sits above the planner: it may import `plait.planner` and
`plait.hardware`, which never import it. torch is imported inside the functions that need it
(only `comm_counter.py`, a torch dispatch mode, imports it at its top), and this file imports no
module, so `import plait.measure` loads no torch.
"""
