"""The parallelisms, applied to the unmodified model in one place, in a fixed order
(`apply.py`: `parallelize` returns the model transformed for its `plait.layout.Layout`, its
optimizer and what the training step needs of it).

One file per parallelism, each a function over the model and a mesh axis (`mesh.py`): tensor
and sequence parallelism (`tensor_parallel.py`), context parallelism (`context_parallel.py`,
ring and Ulysses attention), expert parallelism (`expert_parallel.py`), pipeline stages and
schedules (`pipeline_parallel.py`; the stage plan is `plait.layout.pipeline`), data parallelism
(`data_parallel.py` for DDP, `fully_shard.py` for FSDP2's ZeRO-2/3 and HSDP; ZeRO-1 is an
optimizer, `plait.optim.zero1`), activation checkpointing (`activation_checkpoint.py`). `step.py`
runs a step's forward and backward over micro-batches, `gather.py` assembles whole weights on
rank 0, and `job.py` joins and leaves the job torchrun started.
"""
