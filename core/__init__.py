"""RLHF Studio's core: what train/, serving/ and chat/ share, and nothing that is only one's.

    errors.py       UserError, the base of every error a user causes and can fix
    paths.py        $RLHF_HOME, the model cache and the runs folder (torch-free)
    options.py      typed option definitions: one dataclass field -> CLI flag, YAML key, form input
    runs.py         reading a run folder: RunInfo (stage, status, config, liveness), metrics
    hardware.py     the one answer to "which device, which precision, which kernels"
    process.py      process-wide tuning (allocator, DeepSpeed accelerator), called by entry points
    models.py       resolving and loading base models: the built-in default, folders, GGUF, hub names
    sampling.py     sampling settings, token sampling, padding
    decoder.py      the slot decoder PPO rollouts and the server share
    weights.py      which models the fused decoder runs (Llama-shaped, by their modules), their weights
    kernels.py      the decoder's matrix products: the kernel measured fastest here for each size
    distributed.py  the process group (a group of one without a launcher)
    ratings.py      the ratings store (SQLite) and its export as preference records (torch-free)
    leaderboard.py  Bradley-Terry strengths of checkpoints from votes

Arrows point down: app.py -> chat/, train/, serving/ -> core. Importing any module here changes
nothing in the process (no environment variables, no allocator settings); torch is imported
only by the modules that compute with it.
"""
