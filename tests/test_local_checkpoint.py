"""Workers on another node than their stage load the input checkpoint from its artifact URL: its top-level files
(config, weights) come to a temporary directory of theirs, and nothing else."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import torch

from ernie import ErnieForCausalLM, get_preset
from ernie.checkpoint import load_pretrained, save_pretrained
from stages.training.storage import local_checkpoint


def test_a_checkpoint_url_is_fetched_to_a_temporary_directory_and_loads_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset("tiny_dense"))
    saved = tmp_path / "ckpt"
    save_pretrained(model, saved)
    (saved / "train_state").mkdir()
    (saved / "train_state" / "optimizer.bin").write_bytes(b"\0" * 1024)  # below the top level: not fetched
    fs = fsspec.filesystem("memory")
    fs.put(str(saved), "/run/pretrain/abc", recursive=True)

    path, holder = local_checkpoint("memory:///run/pretrain/abc")
    fetched = Path(path)
    assert holder is not None and fetched.is_dir()
    assert sorted(p.name for p in fetched.iterdir()) == sorted(p.name for p in saved.iterdir() if p.is_file())
    loaded = load_pretrained(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    holder.cleanup()
    assert not fetched.exists()
    fs.rm("/run", recursive=True)


def test_a_local_checkpoint_is_used_where_it_is_and_an_empty_url_is_refused(tmp_path):
    assert local_checkpoint(str(tmp_path)) == (str(tmp_path), None)
    assert local_checkpoint(f"file://{tmp_path}") == (str(tmp_path), None)
    fsspec.filesystem("memory").makedirs("/empty/ckpt", exist_ok=True)
    with pytest.raises(FileNotFoundError, match="memory:///empty/ckpt holds no files"):
        local_checkpoint("memory:///empty/ckpt")
