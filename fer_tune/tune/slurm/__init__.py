"""A study (or its final or PBT stage) as a SLURM batch job (`fer-tune slurm`): the job and the checks before it
(job), the batch script (script), and the step that runs in the job before the driver (ready).

The script (`render`) is plain bash meant to be read and edited. In the job it starts Ray across the allocation
with Ray's own `ray start` (the head in the batch script on the first node, the others through one srun step),
on ports and short temp dirs derived from the job id, with token authentication and a random token made in the
job (srun hands it to the other nodes in the environment; it is never written anywhere); then `ready()` (run as
`python -m fer_tune.tune.slurm.ready ...`) waits for every node and checks from each of them, with
fer-tune's preflight, that it sees the study directory and the Ray storage; then the driver runs on the first
node: `sweep` the first time, `resume` once the study directory holds study.json (the final stage: `final`, the
PBT stage: `pbt`, which continue themselves).

Time limits: SLURM sends USR1 to the batch script GRACE seconds before the limit (`--signal=B:USR1@GRACE`); the
script passes SIGTERM on to the driver, which stops the trials, saves the study and exits 143, and the script
requeues the job (`scontrol requeue`) while fewer than MAX_REQUEUES allocations were requeued. USR1, not TERM: a
preemption, `scontrol requeue` or `scancel` sends SIGTERM to every process of the job at once, the driver
included, and a second SIGTERM passed on by the script would make it stop at once instead of saving.
"""
