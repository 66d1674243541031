"""Training plumbing shared by the training stages (pretrain and the post-training methods); a library, not a stage.

optim.py        AdamW (no decay on norms, biases, routers) and the warmup + cosine schedule
train_state.py  atomic, exactly resumable train state (model, optimizer, step, RNG, data cursor)
launch.py       Ray Train `TorchTrainer` launch and the rank-0 metrics relay to the stage
parallel.py     how the workers share the model (`Layout`: FSDP2 or DDP, expert parallelism)
accumulate.py   gradient accumulation over micro-batches, each weighted by its share of the step
"""
