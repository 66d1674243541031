"""A served app for tests that need real HTTP but not a trained model: a random tiny_moe checkpoint with a
small tokenizer of its own, deployed by the serve stage's own `start` / `stop`."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import torch

import stages.serve as serve_stage
from ernie import ErnieForCausalLM, get_preset
from ernie.checkpoint import save_pretrained
from stages.data.tokenizer import train_tokenizer

VOCAB = 300


def varied_model(preset: str = "tiny_moe", eos: bool = True) -> ErnieForCausalLM:
    """A random model with peaked logits: greedy text that varies (the default init repeats one
    token) and no near-ties that rounding could flip. `eos=False`: the end-of-sentence logit is 0,
    below the best token's, so greedy requests run to max_tokens."""
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset(preset)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
        if not eos:
            model.lm_head.weight[get_preset(preset).eos_token_id] = 0.0
    return model


def random_checkpoint(directory: Path) -> Path:
    """A random tiny_moe checkpoint (fp32) and its tokenizer under `directory`: what it answers does not matter."""
    tokenizer = train_tokenizer(["how many red squares are there", "two", "three", "1+2=3", "reverse cat"] * 30, VOCAB)
    torch.manual_seed(0)
    save_pretrained(ErnieForCausalLM(get_preset("tiny_moe").replace(vocab_size=VOCAB)), directory)
    (directory / "tokenizer").mkdir(exist_ok=True)
    tokenizer.save(str(directory / "tokenizer" / "tokenizer.json"))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(ckpt: Path, model_name: str, app_name: str, **settings) -> Iterator[tuple[serve_stage.Config, str]]:
    """(config, base url) of the app serving `ckpt` on a free port, on the running Ray or a local one."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    cfg = serve_stage.Config(port=free_port(), model_name=model_name, app_name=app_name, **settings)
    serve_stage.validate(cfg)
    try:
        yield cfg, serve_stage.start(ckpt, ckpt / "tokenizer" / "tokenizer.json", cfg, model_name)
    finally:
        serve_stage.stop(cfg)
        if started:
            ray.shutdown()
