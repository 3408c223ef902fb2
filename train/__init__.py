"""RLHF Studio's training stages through DeepSpeed: SFT, reward model, PPO (and train all).

    config.py     every option of every stage (core/options.py turns them into flags and forms)
    data.py       sources -> one record format -> blending and the SFT/RM/PPO split
    tokens.py     records -> token ids -> padded batches
    models.py     LoRA, the causal LM and value-head models training wraps, saving final/
    ds.py         the one boundary to DeepSpeed: configs, engines, checkpoints, full weights
    losses.py     pure loss functions (SFT, pairwise, GAE, PPO policy and value)
    loop.py       the supervised loop SFT and the reward model share
    sft.py, reward.py, ppo.py     one stage each, `main(cfg)` reading top to bottom
    rollout.py    the PPO actor's generation mode (the rollout engine)
    rundir.py     writing a run folder; pipeline.py (train all); launch.py (runs as subprocesses)

Importing it changes nothing in the process: `python -m train` tunes the process
(core/process.py) before torch allocates.
"""
