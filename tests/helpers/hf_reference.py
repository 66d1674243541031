"""Build HF transformers' own ERNIE 4.5 models for the same tiny configs (parity reference)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ernie.hf_config import to_hf_config


def hf_model_from_config(cfg, attn: str = "eager"):
    """The HF model class for `cfg` with random init, fp32, eval mode."""
    import transformers

    hf_cfg_dict = to_hf_config(cfg)
    arch = hf_cfg_dict["architectures"][0]
    config_cls = transformers.AutoConfig.for_model(hf_cfg_dict["model_type"]).__class__
    hf_config = config_cls.from_dict(hf_cfg_dict)
    hf_config._attn_implementation = attn
    model = getattr(transformers, arch)(hf_config).float().eval()
    return model


def load_hf(directory: Path, attn: str = "eager"):
    import transformers

    arch = json.loads((Path(directory) / "config.json").read_text())["architectures"][0]
    model, info = getattr(transformers, arch).from_pretrained(
        directory, output_loading_info=True, dtype=torch.float32, attn_implementation=attn
    )
    return model.eval(), info
