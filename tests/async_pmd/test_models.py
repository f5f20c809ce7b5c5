"""async_pmd.models: the char tokenizer, the tiny-model builder, and local-only load/save."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, whatever happens

import pytest
import torch

from async_pmd import models

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return models.build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def test_tokenizer_round_trips_without_inserting_spaces():
    """Every character is one token; decode(encode(s)) == s; specials take ids 0..3."""
    tok = models.build_char_tokenizer()
    for text in ["3+4=", "12*3=36", "a b  c,d-e", "0"]:
        ids = tok.encode(text)
        assert len(ids) == len(text)
        assert tok.decode(ids) == text
    assert len(tok) == len(models.VOCAB) == 46
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)
    assert tok.decode(tok.encode("7") + [tok.eos_token_id], skip_special_tokens=True) == "7"


def test_tiny_model_loads_back_with_its_tokenizer(tiny_path):
    """build_tiny_model writes a whole HF directory (safetensors + tokenizer), no temp dirs left."""
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tiny_path))
    assert os.listdir(tiny_path.parent) == ["tiny"]
    model = models.load_model(tiny_path)
    tok = models.load_tokenizer(tiny_path)
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert tok.decode(tok.encode("3+4=")) == "3+4="
    logits = model(input_ids=torch.tensor([tok.encode("3+4=")])).logits
    assert logits.shape == (1, 4, len(tok)) and torch.isfinite(logits).all()


def test_tiny_model_weights_are_a_function_of_the_seed(tmp_path):
    """Same seed → identical weights; another seed → different; the global RNG is untouched."""
    state = torch.random.get_rng_state()
    a = models.load_model(models.build_tiny_model(tmp_path / "a", seed=3)).state_dict()
    b = models.load_model(models.build_tiny_model(tmp_path / "b", seed=3)).state_dict()
    c = models.load_model(models.build_tiny_model(tmp_path / "c", seed=4)).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_ensure_tiny_model_builds_once_and_refuses_a_different_spec(tmp_path):
    path = tmp_path / "m"
    models.ensure_tiny_model(path, hidden_size=32, num_heads=2, num_kv_heads=1)
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    models.ensure_tiny_model(path, hidden_size=32, num_heads=2, num_kv_heads=1)
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="hidden_size=16"):
        models.ensure_tiny_model(path, hidden_size=16)
    with pytest.raises(TypeError, match="unknown tiny-model spec"):
        models.ensure_tiny_model(path, hiden_size=32)


def test_reusing_a_built_tiny_model_imports_neither_transformers_nor_torch(tmp_path):
    """The launcher checks an existing tiny model before it starts any actor: reading config.json
    is enough, so a fresh process does it without transformers' AutoConfig (which imports torch,
    ~4 CPU seconds on the way to the first learner step). The spec is still checked there."""
    path = models.build_tiny_model(tmp_path / "m", hidden_size=32, num_heads=2, num_kv_heads=1)
    check = ("import sys; from async_pmd import models; "
             f"models.ensure_tiny_model({str(path)!r}, hidden_size=32, num_heads=2, num_kv_heads=1); "
             "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
    refuse = check.replace("hidden_size=32", "hidden_size=16")
    proc = subprocess.run([sys.executable, "-c", refuse], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "hidden_size=16" in proc.stderr


def test_missing_model_path_raises_without_downloading(tmp_path):
    for path in [tmp_path / "nope", tmp_path, "Qwen/Qwen2.5-0.5B"]:
        with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
            models.load_model(path)
        with pytest.raises(FileNotFoundError, match="local directories only"):
            models.load_tokenizer(path)


def test_save_model_replaces_a_model_in_place(tiny_path, tmp_path):
    model, tok = models.load_model(tiny_path), models.load_tokenizer(tiny_path)
    out = tmp_path / "saved"
    models.save_model(model, tok, out)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    models.save_model(model, tok, out)
    assert os.listdir(tmp_path) == ["saved"]
    assert torch.equal(models.load_model(out).lm_head.weight, model.lm_head.weight)
    assert models.load_tokenizer(out).decode(tok.encode("9-2=")) == "9-2="


def test_tied_embeddings_option(tmp_path):
    model = models.load_model(models.build_tiny_model(tmp_path / "tied", tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_racing_builders_leave_one_whole_model(tmp_path):
    """Two processes ensuring the same path: both succeed, no temp dirs remain. (Processes, not
    threads: two threads' first import of transformers races inside its lazy module.)"""
    import subprocess
    import sys

    script = ("import sys; from async_pmd import models; "
              "models.ensure_tiny_model(sys.argv[1], hidden_size=32, num_heads=2, num_kv_heads=1)")
    builders = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "shared")],
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
    failures = [b.stderr.read()[-2000:] for b in builders if b.wait() != 0]
    assert failures == [] and os.listdir(tmp_path) == ["shared"]
    assert models.load_model(tmp_path / "shared").config.hidden_size == 32


def test_a_builder_finishing_between_the_two_looks_is_not_an_error(tmp_path, monkeypatch):
    """The race CI once hit, made to happen every time: another builder's rename lands right after
    this one found no config.json. Its whole model is kept and nothing is raised (with the looks
    in the other order this read as "exists but holds no config.json")."""
    import pathlib

    shared, theirs = tmp_path / "shared", tmp_path / "theirs"
    models.build_tiny_model(theirs, hidden_size=32, num_heads=2, num_kv_heads=1)
    exists = pathlib.Path.exists

    def exists_then_the_other_builder_finishes(self, *args, **kwargs):
        found = exists(self, *args, **kwargs)
        if self == shared / "config.json" and exists(theirs):
            os.rename(theirs, shared)
        return found

    monkeypatch.setattr(pathlib.Path, "exists", exists_then_the_other_builder_finishes)
    models.ensure_tiny_model(shared, hidden_size=32, num_heads=2, num_kv_heads=1)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["shared"] and not theirs.exists()
    assert models.load_model(shared).config.hidden_size == 32


def test_the_tiny_tokenizer_loads_back_as_built_without_torch(tiny_path):
    """The saved tokenizer.json loads as the class that saved it, so it tokenizes as built:
    spaces kept, an unknown character `<unk>`. (AutoTokenizer picks Qwen2Tokenizer for a qwen2
    model, whose byte-level pipeline drops both from this vocabulary.) Its import reaches no
    torch: in a fresh process the driver's load leaves torch unimported."""
    import subprocess
    import sys

    built, loaded = models.build_char_tokenizer(), models.load_tokenizer(tiny_path)
    texts = ["3+4=", "12*3=36", "a b  c,d-e", "?!"]
    assert [loaded.encode(t) for t in texts] == [built.encode(t) for t in texts]
    assert loaded.decode(loaded.encode("a b  c")) == "a b  c" and loaded.encode("?") == [loaded.unk_token_id]
    ids = [[5, 6, 1, 0], [7, 2, 8]]
    assert loaded.batch_decode(ids, skip_special_tokens=True) == built.batch_decode(ids, skip_special_tokens=True)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.bos_token_id) == (0, 1, 2)
    script = ("import sys; from async_pmd.models import load_tokenizer; "
              f"load_tokenizer({str(tiny_path)!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_a_model_specific_tokenizer_class_still_goes_through_autotokenizer(tiny_path, tmp_path):
    import json
    import shutil

    path = shutil.copytree(tiny_path, tmp_path / "named")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    assert type(models.load_tokenizer(path)).__name__ == "Qwen2Tokenizer"


def test_an_existing_tiny_model_is_checked_against_defaults_its_config_leaves_out(tmp_path):
    """A field config.json omits is the config class's default (Qwen2: untied embeddings), so
    omitting it neither passes a wrong spec nor refuses a right one."""
    import json

    path = models.build_tiny_model(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    del config["tie_word_embeddings"]
    (path / "config.json").write_text(json.dumps(config))
    models.ensure_tiny_model(path, tie_word_embeddings=False)
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        models.ensure_tiny_model(path, tie_word_embeddings=True)
