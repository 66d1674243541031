"""Training plumbing shared by the training stages (pretrain, sft, dpo); a library, not a stage.

optim.py        AdamW (no decay on norms, biases, routers) and the warmup + cosine schedule
train_state.py  atomic, exactly resumable train state (model, optimizer, step, RNG, data cursor)
launch.py       Ray Train `TorchTrainer` launch and the rank-0 metrics relay to the stage
"""
