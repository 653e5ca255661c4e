"""gptcli.loading.gpt2_folder stands in for transformers' config, generation config and tokenizer: the same
values."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from gptcli.generation.generate import eos_ids
from gptcli.generation.sampling import generation_config_values
from gptcli.loading import gpt2_folder as plain
from gptcli.loading.models import builtin_path, context_length, load_model

TEXTS = [
    "Hello world",
    " leading space and  two",
    "今天天气很好，我们去公园吧。",
    "emoji 🙂 and combining é and RTL שלום",
    "<|endoftext|>inside<|endoftext|>",
    "tabs\tand\nnewlines\r\n",
    "12345 3.14159 ...!!!",
]


KINDS = ["bpe", "short", "builtin", "saved GPT2TokenizerFast", "saved tokenizer.json", "finetuned", "scratch"]


@pytest.fixture(scope="module")
def saved_folders(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders as users have them: written by transformers 5's save_pretrained (which adds
    add_prefix_space, errors and a null pad_token to tokenizer_config.json), and by gptcli finetune."""
    # GPT2TokenizerFast is exported lazily; transformers' __init__ hides the name from mypy
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast  # type: ignore[attr-defined]

    from gptcli.cli import run

    root = tmp_path_factory.mktemp("saved")
    out = {}
    for kind, cls in (("saved GPT2TokenizerFast", GPT2TokenizerFast), ("saved tokenizer.json", None)):
        folder = Path(shutil.copytree(models["bpe"], root / kind.replace(" ", "-")))
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
        if cls is None:
            tokenizer = PreTrainedTokenizerFast(
                tokenizer_file=str(models["bpe"] / "tokenizer.json"),
                bos_token="<|endoftext|>",
                eos_token="<|endoftext|>",
                unk_token="<|endoftext|>",
            )
        else:
            tokenizer = cls.from_pretrained(models["bpe"])
        tokenizer.save_pretrained(folder)
        out[kind] = folder
    corpus = root / "corpus.txt"
    corpus.write_text(TEXTS[2] * 200, encoding="utf-8")
    common = ["--steps", "1", "--block-size", "16", "--batch-size", "2"]
    assert run(["finetune", str(corpus), "-m", str(models["bpe"]), "-o", str(root / "ft"), *common]) == 0
    scratch = ["--from-scratch", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--context", "32"]
    assert (
        run(["finetune", str(corpus), "-m", str(models["bpe"]), "-o", str(root / "sc"), *common, *scratch])
        == 0
    )
    out["finetuned"], out["scratch"] = root / "ft", root / "sc"
    return out


@pytest.fixture(scope="module", params=KINDS)
def folder(request, models: dict[str, Path], saved_folders: dict[str, Path]) -> Path:
    if request.param == "builtin":
        return builtin_path()
    return models.get(request.param) or saved_folders[request.param]


@pytest.fixture(scope="module")
def pair(folder: Path):
    loaded = plain.load(folder)
    assert loaded is not None, f"{folder} should be plain"
    return loaded, AutoTokenizer.from_pretrained(folder)


def test_tokenizer_equals_transformers(pair) -> None:
    (_, _, ours), theirs = pair
    for role in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        assert getattr(ours, f"{role}_token_id") == getattr(theirs, f"{role}_token_id"), role
    assert ours.all_special_ids == theirs.all_special_ids
    assert len(ours) == len(theirs) and ours.get_vocab() == theirs.get_vocab()
    ids = list(range(0, len(theirs), 7))
    assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids[3]) == theirs.convert_ids_to_tokens(ids[3])
    for text in TEXTS:
        for flag in (True, False):
            assert ours.encode(text, add_special_tokens=flag) == theirs.encode(text, add_special_tokens=flag)
            ids = theirs.encode(text)
            assert ours.decode(ids, skip_special_tokens=flag) == theirs.decode(ids, skip_special_tokens=flag)


def test_calling_the_tokenizer_equals_transformers(pair) -> None:
    (config, _, ours), theirs = pair
    assert ours(TEXTS[2]) == dict(theirs(TEXTS[2]))
    assert ours(TEXTS, add_special_tokens=False) == dict(theirs(TEXTS, add_special_tokens=False))
    assert ours(TEXTS, return_attention_mask=False) == dict(theirs(TEXTS, return_attention_mask=False))
    # What the stand-in does not do itself, transformers' tokenizer of the folder does.
    assert ours(TEXTS[2], return_tensors="pt")["input_ids"].tolist() == (
        theirs(TEXTS[2], return_tensors="pt")["input_ids"].tolist()
    )
    # The rest of transformers' API is asked for by name; a name the stand-in lacks is an error.
    assert ours.transformers_tokenizer().tokenize(TEXTS[0]) == theirs.tokenize(TEXTS[0])
    with pytest.raises(AttributeError):
        ours.tokenize  # noqa: B018
    with pytest.raises(AttributeError):
        config.vocab_sise  # noqa: B018 -- a misspelt config key is an error, not None


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40), ids=st.lists(st.integers(0, 255), max_size=12))
def test_tokenizer_equals_transformers_on_any_text(pair, text: str, ids: list[int]) -> None:
    (_, _, ours), theirs = pair
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_configs_equal_transformers(folder: Path, pair) -> None:
    (config, generation, _), _ = pair
    theirs = AutoConfig.from_pretrained(folder)
    for name in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "hidden_size", "model_type"):
        assert getattr(config, name) == getattr(theirs, name), name
    for name in ("bos_token_id", "eos_token_id", "architectures", "max_position_embeddings"):
        assert getattr(config, name) == getattr(theirs, name), name
    assert context_length(config) == context_length(theirs)
    try:
        their_generation = GenerationConfig.from_pretrained(folder)
    except OSError:
        their_generation = GenerationConfig.from_model_config(theirs)
    assert generation_config_values(generation) == generation_config_values(their_generation)
    assert generation.eos_token_id == their_generation.eos_token_id


def test_a_missing_generation_config_takes_the_config_token_ids(models, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(models["bpe"], tmp_path / "m"))
    (folder / "generation_config.json").unlink(missing_ok=True)
    lm = load_model(str(folder), device="cpu")
    assert isinstance(lm.generation_config, plain.GenerationConfig)
    their = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder))
    assert eos_ids(lm) == {their.eos_token_id} and generation_config_values(lm.generation_config) == {}


@pytest.mark.parametrize(
    "change",
    [
        {"tokenizer_config.json": {"add_bos_token": True}},
        {"tokenizer_config.json": {"add_prefix_space": True}},
        {"tokenizer_config.json": {"errors": "strict"}},
        {"tokenizer_config.json": {"extra_special_tokens": ["<|im_start|>"]}},
        {"special_tokens_map.json": {"eos_token": "<|not-in-vocab|>"}},
        {"tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer"}},
        {"tokenizer.json": {"normalizer": {"type": "Lowercase"}}},
        {"config.json": {"activation_function": "relu"}},
        {"tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|not-in-vocab|>"}},
        {"tokenizer.json": {"model": {"dropout": 0.1}}},  # random merges: never what a user wants
        {
            "tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer"},
            "tokenizer.json": {"model": {"byte_fallback": True}},
        },
    ],
)
def test_anything_unusual_goes_through_transformers(models, tmp_path: Path, change) -> None:
    folder = Path(shutil.copytree(models["bpe"], tmp_path / "m"))
    for name, values in change.items():
        data = json.loads((folder / name).read_text()) if (folder / name).exists() else {}
        for key, value in values.items():  # one level deep: {"model": {"dropout": 0.1}} changes one key
            data[key] = (
                {**data[key], **value}
                if isinstance(value, dict) and isinstance(data.get(key), dict)
                else value
            )
        (folder / name).write_text(json.dumps(data))
    assert plain.load(folder) is None


def test_truncation_and_padding_stored_in_tokenizer_json_are_off_as_in_transformers(
    models, tmp_path: Path
) -> None:
    folder = Path(shutil.copytree(models["bpe"], tmp_path / "m"))
    data = json.loads((folder / "tokenizer.json").read_text())
    data["truncation"] = {"max_length": 4, "stride": 0, "strategy": "LongestFirst", "direction": "Right"}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    ours = plain.load_tokenizer(folder)
    assert ours is not None
    assert ours.encode(TEXTS[2]) == AutoTokenizer.from_pretrained(folder).encode(TEXTS[2])
    assert len(ours.encode(TEXTS[2])) > 4


def test_the_class_named_in_config_json_decides_as_in_transformers(models, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(models["bpe"], tmp_path / "m"))
    (folder / "tokenizer_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    ours, theirs = plain.load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert ours is not None and ours.class_name == type(theirs).__name__
    assert ours.all_special_ids == theirs.all_special_ids and ours.eos_token_id == theirs.eos_token_id


def test_bert_style_tokenizers_go_through_transformers(models) -> None:
    assert plain.load(models["bert"]) is None
    assert plain.load_tokenizer(models["bert"]) is None


@pytest.mark.slow
def test_complete_and_tokenize_on_a_plain_gpt2_never_import_transformers(models, saved_folders) -> None:
    folders = [models["bpe"], *saved_folders.values()]
    code = (
        "import sys; from gptcli.cli import run\n"
        f"for folder in {[str(f) for f in folders]!r}:\n"
        "    for argv in (['complete', 'hi', '-n', '3', '--greedy'], ['tokenize', 'hi'], ['topk', 'hi']):\n"
        "        assert run([*argv, '-m', folder]) == 0, (argv, folder)\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", [["tokenize", "hi"], ["info"]])
def test_tokenize_and_info_need_neither_torch_nor_transformers(models, command: list[str]) -> None:
    """On a plain folder `tokenizers` is all these two need: no seconds spent importing torch."""
    argv = [*command, "-m", str(models["bpe"]), *(["--device", "cpu"] if command == ["info"] else [])]
    code = (
        "import sys; from gptcli.cli import run\n"
        f"assert run({argv!r}) == 0\n"
        "heavy = {'torch', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, sorted(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
