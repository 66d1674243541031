"""The vLLM backend of the serve stage (stages/serve/vllm_backend.py) on a CPU machine: the Ray Serve LLM configs it
builds for a real exported checkpoint, and the preflight that refuses, before anything is deployed, what would fail
on a GPU cluster. vLLM is not installed here (it needs CUDA), so `deploy` is not run: the configs are checked
against the field names of the installed Ray's own pydantic models, read from its source."""

from __future__ import annotations

import ast
import codecs
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ernie import ErnieForCausalLM, get_preset
from ernie.chat_template import render
from ernie.checkpoint import save_pretrained
from pipeline.contract import UserError
from stages.quantize.export import write_export
from stages.quantize.rtn import quantize_model
from stages.serve import vllm_backend as vb
from stages.serve.vllm_backend import VLLMSettings, llm_config_dicts, preflight

VERSION = vb.MIN_VLLM_VERSION  # a vLLM version preflight accepts, given explicitly (none is installed here)
TINY_HEADS, TINY_KV_HEADS = 4, 2  # tiny_moe / tiny_dense


def _qckpt(root: Path, name: str, preset: str, bits: int, symmetric: bool, fmt: str = "gptq") -> Path:
    """A qckpt as the quantize stage leaves it for vLLM: our packed model (only its marker here) and export-<fmt>/."""
    torch.manual_seed(0)
    model = ErnieForCausalLM(get_preset(preset)).eval()
    quantize_model(model, bits, 32, symmetric, ["lm_head", "vision_encoder", "adapter"])
    tok = root / "tok"
    tok.mkdir(exist_ok=True)
    (tok / "tokenizer.json").write_text("{}")
    qckpt = root / name
    qckpt.mkdir()
    (qckpt / "quant_config.json").write_text("{}")
    write_export(model, fmt, qckpt / f"export-{fmt}", tok, symmetric)
    return qckpt


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_backend")
    out = {
        "moe4": _qckpt(root, "moe4", "tiny_moe", 4, True),
        "moe4_asym": _qckpt(root, "moe4_asym", "tiny_moe", 4, False),
        "moe2": _qckpt(root, "moe2", "tiny_moe", 2, True),
        "dense2": _qckpt(root, "dense2", "tiny_dense", 2, True),
        "moe4_ct": _qckpt(root, "moe4_ct", "tiny_moe", 4, True, "compressed-tensors"),
        "moe4_ct_asym": _qckpt(root, "moe4_ct_asym", "tiny_moe", 4, False, "compressed-tensors"),
    }
    ckpt = save_pretrained(ErnieForCausalLM(get_preset("tiny_dense")), root / "ckpt")  # bf16 serving, HF layout
    (ckpt / "tokenizer").mkdir()
    (ckpt / "tokenizer" / "tokenizer.json").write_text("{}")
    out["ckpt"] = ckpt
    return out


# ---------------------------------------------------------------------------------------------- config dicts
def test_the_colocated_config_serves_the_export_with_the_method_its_config_names(models):
    settings = VLLMSettings(num_replicas=2, max_model_len=2048, accelerator_type="H100")
    args = llm_config_dicts(settings, models["moe4"], "ernie-tiny")
    assert list(args) == ["llm_configs"]
    (config,) = args["llm_configs"]
    export = models["moe4"] / "export-gptq"
    assert config["model_loading_config"] == {"model_id": "ernie-tiny", "model_source": str(export)}
    assert config["deployment_config"] == {"num_replicas": 2}
    assert config["accelerator_type"] == "H100"
    engine = config["engine_kwargs"]
    quant_method = json.loads((export / "config.json").read_text())["quantization_config"]["quant_method"]
    assert quant_method == "gptq"
    # 4-bit symmetric groups of 32: vLLM's Marlin GPTQ kernels, bf16 activations
    assert (engine["quantization"], engine["dtype"]) == ("gptq_marlin", "bfloat16")
    assert (engine["tensor_parallel_size"], engine["pipeline_parallel_size"], engine["max_model_len"]) == (1, 1, 2048)
    assert engine["chat_template"] == vb.CHAT_TEMPLATE
    assert "kv_transfer_config" not in engine and "tokenizer" not in engine  # the export carries its tokenizer


def test_the_pd_config_gives_each_role_its_replicas_and_the_kv_connector(models):
    settings = VLLMSettings(pd=True, prefill_replicas=1, decode_replicas=3, tensor_parallel_size=2)
    args = llm_config_dicts(settings, models["moe4_ct"], "ernie-tiny")
    assert list(args) == ["prefill_config", "decode_config"]
    prefill, decode = args["prefill_config"], args["decode_config"]
    assert prefill["deployment_config"] == {"num_replicas": 1} and decode["deployment_config"] == {"num_replicas": 3}
    for config in (prefill, decode):
        engine = config["engine_kwargs"]
        assert config["model_loading_config"]["model_source"] == str(models["moe4_ct"] / "export-compressed-tensors")
        assert engine["kv_transfer_config"] == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
        assert (engine["quantization"], engine["tensor_parallel_size"]) == ("compressed-tensors", 2)
    assert prefill["model_loading_config"]["model_id"] == decode["model_loading_config"]["model_id"]
    # Ray's connector backends write the engine id into kv_transfer_config: the roles must not share one dict
    prefill["engine_kwargs"]["kv_transfer_config"]["engine_id"] = "p"
    assert "engine_id" not in decode["engine_kwargs"]["kv_transfer_config"]


def test_kernels_and_dtype_follow_the_export(models):
    def engine(name, **kw):
        return llm_config_dicts(VLLMSettings(**kw), models[name], "m")["llm_configs"][0]["engine_kwargs"]

    # 2 bits: not a Marlin width; vLLM's gptq kernels take fp16 activations only
    assert (engine("dense2")["quantization"], engine("dense2")["dtype"]) == ("gptq", "float16")
    # a ckpt: bf16, no quantization, the tokenizer from its tokenizer/ dir
    bf16 = engine("ckpt")
    assert "quantization" not in bf16 and bf16["dtype"] == "bfloat16"
    assert bf16["tokenizer"] == str(models["ckpt"] / "tokenizer")
    assert engine("moe4", engine_kwargs={"enable_prefix_caching": True})["enable_prefix_caching"] is True
    # export= picks the export; a qckpt holding only the other one is refused by name
    with pytest.raises(UserError, match=r"export-compressed-tensors/.*quantize\.export=\[gptq\]"):
        engine("moe4", export="compressed-tensors")


def _pydantic_fields(relative: str, cls: str) -> set[str]:
    """The field names of a pydantic model in the installed Ray, read from its source (ray.serve.llm does not
    import without vLLM): annotated class attributes, private ones left out."""
    path = vb._ray_source(relative)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {
                s.target.id
                for s in node.body
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and not s.target.id.startswith("_")
            }
    raise AssertionError(f"{cls} not in {path}: Ray Serve LLM moved it")


def test_the_configs_use_only_fields_of_ray_serve_llms_own_models(models):
    llm_fields = _pydantic_fields("llm/_internal/serve/core/configs/llm_config.py", "LLMConfig")
    loading_fields = _pydantic_fields("llm/_internal/serve/core/configs/llm_config.py", "ModelLoadingConfig")
    serving_fields = _pydantic_fields("llm/_internal/serve/core/ingress/builder.py", "LLMServingArgs")
    pd_fields = _pydantic_fields("llm/_internal/serve/serving_patterns/prefill_decode/builder.py", "PDServingArgs")
    # LLMConfig validates deployment_config as Serve's DeploymentConfig
    deployment_fields = _pydantic_fields("serve/_private/config.py", "DeploymentConfig")
    assert {"model_loading_config", "engine_kwargs", "deployment_config", "accelerator_type"} <= llm_fields
    colocated = llm_config_dicts(VLLMSettings(accelerator_type="A100-80G"), models["moe4"], "m")
    pd = llm_config_dicts(VLLMSettings(pd=True, accelerator_type="H100"), models["moe4"], "m")
    assert set(colocated) <= serving_fields and set(pd) <= pd_fields
    for config in [*colocated["llm_configs"], pd["prefill_config"], pd["decode_config"]]:
        assert set(config) <= llm_fields
        assert set(config["model_loading_config"]) <= loading_fields
        assert set(config["deployment_config"]) <= deployment_fields
        assert config["accelerator_type"] in vb.ray_accelerator_types()


def test_tensor_parallel_zero_takes_the_largest_size_that_splits_the_model(models):
    def tp(gpus, **kw):
        args = llm_config_dicts(VLLMSettings(tensor_parallel_size=0, **kw), models["moe4"], "m", gpus)
        configs = args.get("llm_configs") or [args["prefill_config"], args["decode_config"]]
        return {c["engine_kwargs"]["tensor_parallel_size"] for c in configs}

    assert tp(8, num_replicas=2) == {4}
    assert tp(6, num_replicas=2) == {2}  # 3 GPUs per engine: 3 does not divide the 4 heads
    assert tp(7, pd=True, prefill_replicas=1, decode_replicas=1) == {2}
    with pytest.raises(UserError, match="needs the cluster's GPU count"):
        tp(None)


def test_settings_that_belong_elsewhere_are_refused(models):
    with pytest.raises(UserError, match="engine_kwargs.tensor_parallel_size: set serve.vllm.tensor_parallel_size"):
        llm_config_dicts(VLLMSettings(engine_kwargs={"tensor_parallel_size": 2}), models["moe4"], "m")
    with pytest.raises(UserError, match="engine_kwargs.model: Ray Serve LLM takes the model"):
        llm_config_dicts(VLLMSettings(engine_kwargs={"model": "x"}), models["moe4"], "m")
    with pytest.raises(UserError, match=r"gpu_memory_utilization=1\.5 must be in \(0, 1\]"):
        llm_config_dicts(VLLMSettings(gpu_memory_utilization=1.5), models["moe4"], "m")


# ---------------------------------------------------------------------------------------------- preflight
def test_preflight_passes_a_deployable_plan_and_reports_it(models):
    settings = VLLMSettings(pd=True, tensor_parallel_size=2, prefill_replicas=1, decode_replicas=2)
    report = preflight(settings, models["moe4"], "m", cluster_gpus=6, vllm_version=VERSION)
    assert (report.gpus_needed, report.cluster_gpus, report.vllm_version_from) == (6, 6, "given")
    assert (report.quantization, report.architecture) == ("gptq_marlin", "Ernie4_5_MoeForCausalLM")
    assert report.model_source == str(models["moe4"] / "export-gptq")


def test_preflight_says_vllm_runs_only_on_gpu_machines_where_it_is_missing(models):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(UserError, match=r"not installed.*only on GPU machines.*ray\[llm\].*serve\.backend=engine"):
        preflight(VLLMSettings(), models["moe4"], "m", cluster_gpus=8)


def test_preflight_refuses_a_vllm_older_than_the_minimum(models):
    with pytest.raises(UserError, match=rf"vLLM 0\.5\.0 is older than {VERSION}"):
        preflight(VLLMSettings(), models["moe4"], "m", cluster_gpus=8, vllm_version="0.5.0")


def test_preflight_refuses_a_kv_connector_it_does_not_deploy(models):
    for connector in ("P2pNcclConnector", "MultiConnector"):  # unknown to Ray 2.60; known but not deployed here
        settings = VLLMSettings(pd=True, kv_connector=connector)
        with pytest.raises(UserError, match=rf"kv_connector='{connector}'.*NixlConnector, LMCacheConnectorV1"):
            preflight(settings, models["moe4"], "m", cluster_gpus=8, vllm_version=VERSION)


def test_preflight_refuses_tensor_parallel_sizes_the_model_cannot_be_split_by(models):
    with pytest.raises(UserError, match=rf"tensor_parallel_size=3 does not divide the model's {TINY_HEADS} attention"):
        preflight(VLLMSettings(tensor_parallel_size=3), models["moe4"], "m", cluster_gpus=8, vllm_version=VERSION)
    with pytest.raises(UserError, match="pipeline_parallel_size=4 exceeds the model's 3 layers"):
        preflight(VLLMSettings(pipeline_parallel_size=4), models["moe4"], "m", cluster_gpus=8, vllm_version=VERSION)
    # 4 ranks over 2 KV heads replicate each twice: allowed
    preflight(VLLMSettings(tensor_parallel_size=4), models["moe4"], "m", cluster_gpus=4, vllm_version=VERSION)


def test_preflight_refuses_tensor_parallel_sizes_that_do_not_split_the_experts(models, tmp_path):
    config = json.loads((models["moe4"] / "export-gptq" / "config.json").read_text())
    config.pop("quantization_config")
    (tmp_path / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 42}))  # a bf16 ckpt
    (tmp_path / "model.safetensors").write_bytes(b"")  # preflight looks for the weights, does not read them
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match=r"tensor_parallel_size=4 does not divide the model's moe_intermediate_size"):
        preflight(VLLMSettings(tensor_parallel_size=4), tmp_path, "m", cluster_gpus=4, vllm_version=VERSION)
    # expert parallelism places whole experts: their intermediate size is not split
    settings = VLLMSettings(tensor_parallel_size=4, engine_kwargs={"enable_expert_parallel": True})
    preflight(settings, tmp_path, "m", cluster_gpus=4, vllm_version=VERSION)


def test_preflight_refuses_more_gpus_than_the_cluster_has(models):
    colocated = VLLMSettings(tensor_parallel_size=2, num_replicas=2)
    with pytest.raises(UserError, match=r"needs 4 GPUs: num_replicas=2 x tensor_parallel_size=2.*cluster has 3"):
        preflight(colocated, models["moe4"], "m", cluster_gpus=3, vllm_version=VERSION)
    pd = VLLMSettings(pd=True, prefill_replicas=2, decode_replicas=2)
    with pytest.raises(UserError, match=r"needs 4 GPUs: \(prefill_replicas=2 \+ decode_replicas=2\)"):
        preflight(pd, models["moe4"], "m", cluster_gpus=3, vllm_version=VERSION)


def test_preflight_refuses_a_qckpt_without_a_vllm_export(tmp_path):
    (tmp_path / "quant_config.json").write_text("{}")
    with pytest.raises(UserError, match=rf"{tmp_path} is a quantized checkpoint.*quantize\.export=\[gptq\]"):
        preflight(VLLMSettings(), tmp_path, "m", cluster_gpus=8, vllm_version=VERSION)


def test_preflight_refuses_exports_vllms_kernels_would_run_wrong(models):
    def check(name):
        preflight(VLLMSettings(), models[name], "m", cluster_gpus=8, vllm_version=VERSION)

    with pytest.raises(UserError, match=r"asymmetric GPTQ export .* MoE model.*quantize\.symmetric=true"):
        check("moe4_asym")
    with pytest.raises(UserError, match=r"MoE experts are 2-bit.*4- or 8-bit codes only"):
        check("moe2")
    with pytest.raises(UserError, match=r"asymmetric compressed-tensors export of a MoE model"):
        check("moe4_ct_asym")
    check("dense2")  # 2-bit linears run on vLLM's gptq kernels


def test_preflight_refuses_models_vllm_does_not_run_as_ernie(models, tmp_path):
    config = json.loads((models["ckpt"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match=r"architectures=\['LlamaForCausalLM'\]; vLLM runs ERNIE 4\.5 as one of"):
        preflight(VLLMSettings(), tmp_path, "m", cluster_gpus=8, vllm_version=VERSION)
    with pytest.raises(UserError, match="max_model_len=8192 exceeds the model's max_position_embeddings"):
        preflight(VLLMSettings(max_model_len=8192), models["ckpt"], "m", cluster_gpus=8, vllm_version=VERSION)
    with pytest.raises(UserError, match="accelerator_type='H999' is not an accelerator type Ray knows"):
        preflight(VLLMSettings(accelerator_type="H999"), models["ckpt"], "m", cluster_gpus=8, vllm_version=VERSION)


def test_the_minimum_vllm_is_the_one_this_ray_pins():
    # when Ray is upgraded, its pin moves: revisit MIN_VLLM_VERSION (and docs/serving_vllm.md) then
    assert vb.ray_vllm_pin() == vb.MIN_VLLM_VERSION


# ---------------------------------------------------------------------------------------------- chat template
CHATS = [
    [{"role": "user", "content": "2+3="}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    [
        {"role": "user", "content": "2+3="},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "and 4+4?"},
    ],
    [
        {"role": "user", "content": "why?"},
        {"role": "assistant", "content": "because", "reasoning_content": "think\nmore"},
        {"role": "user", "content": "ok"},
    ],
]


def test_the_chat_template_renders_as_ernie_does_through_transformers():
    """vLLM applies a chat template through the tokenizer's `apply_chat_template` (transformers' Jinja sandbox);
    given inline, it first unescapes it (`codecs.decode(..., "unicode_escape")` in vllm's load_chat_template)."""
    from jinja2.exceptions import TemplateError
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    for template in (vb.CHAT_TEMPLATE, codecs.decode(vb.CHAT_TEMPLATE, "unicode_escape")):
        for chat in CHATS:
            for generation, thinking in ((False, False), (True, False), (True, True)):
                got = tokenizer.apply_chat_template(
                    chat,
                    chat_template=template,
                    tokenize=False,
                    add_generation_prompt=generation,
                    enable_thinking=thinking,
                )
                assert got == render(chat, generation, thinking), (chat, generation, thinking)
        # vLLM hands content as a list of parts when the template reads them
        parts = [{"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "3="}]}]
        assert tokenizer.apply_chat_template(parts, chat_template=template, tokenize=False) == render(parts)
        with pytest.raises(TemplateError, match="expected system, user or assistant"):
            tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], chat_template=template, tokenize=False)
        late_system = [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]
        with pytest.raises(TemplateError, match="a system message may only come first"):
            tokenizer.apply_chat_template(late_system, chat_template=template, tokenize=False)
