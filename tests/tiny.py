"""Build tiny, real GPT-2 models for tests: random weights, trained tokenizers, saved with save_pretrained.

Nothing here is mocked: the folders these functions write are loaded through the same
`from_pretrained` path that users hit, so the tests exercise the real loading code.
"""

from __future__ import annotations

from pathlib import Path

# A few KB of mixed Chinese and English text, written for the tests (not taken from any corpus).
TEXT = """\
今天天气很好，我们去公园散步吧。
今天天气不错，阳光明媚，适合出去玩。
明天可能会下雨，记得带伞。
我喜欢在早上喝一杯热茶，然后开始工作。
这本书很有意思，我已经读了三遍。
他每天坐地铁去上班，路上大概需要四十分钟。
我们一起吃晚饭吧，我知道附近有一家很好吃的饭馆。
学习一门新的语言需要时间和耐心。
小猫在窗台上睡觉，阳光照在它的身上。
请问火车站怎么走？一直往前走，然后向左转。
The weather is nice today, so we are going for a walk in the park.
It might rain tomorrow, so remember to take an umbrella.
I like to drink a cup of hot tea in the morning before I start working.
This book is very interesting; I have read it three times already.
He takes the subway to work every day, and the trip takes about forty minutes.
Let's have dinner together. I know a good restaurant nearby.
Learning a new language takes time and patience.
The cat is sleeping on the windowsill in the sun.
Excuse me, how do I get to the train station? Go straight ahead, then turn left.
Hello world! Numbers like 12345 and 3.14159 should tokenize too.
"""


def byte_level_tokenizer(vocab_size: int = 400):
    """A GPT-2-style byte-level BPE trained on TEXT, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT.splitlines() * 3, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def bert_char_tokenizer():
    """A BERT-style Chinese tokenizer: one token per CJK character, [CLS]/[SEP]/[PAD]/[UNK]/[MASK]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    # BertTokenizerFast is exported lazily; transformers' __init__ hides the name from mypy
    from transformers import BertTokenizerFast  # type: ignore[attr-defined]

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = sorted({c for c in TEXT.lower() if not c.isspace()})
    words = sorted({w.strip(".,;!?'").lower() for w in TEXT.split() if w.isascii()} - {""})
    vocab = {t: i for i, t in enumerate(specials + chars + [w for w in words if w not in chars])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def save_gpt2(
    folder: Path,
    tokenizer,
    *,
    n_positions: int = 128,
    seed: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Save a random 2-layer GPT-2 with `tokenizer` into `folder` (safetensors), and return the folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id if bos_token_id is None else bos_token_id,
        eos_token_id=tokenizer.eos_token_id if eos_token_id is None else eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    _train_a_little(model, tokenizer, block=min(16, n_positions - 1))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def _train_a_little(model, tokenizer, *, block: int, steps: int = 150) -> None:
    """A few AdamW steps on TEXT. A trained model's greedy choices have margins, as real models' do: a
    random one is full of near-ties that any change of rounding flips, which would make "greedy ids
    identical to transformers" a test of summation order rather than of correctness."""
    import torch

    # Each line a document that ends with the end-of-text token, so the model learns where texts end.
    eos = model.config.eos_token_id
    lines = tokenizer(TEXT.splitlines(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([i for _ in range(3) for line in lines for i in (*line, eos)])
    count = (len(ids) - 1) // block
    blocks = ids[: count * block + 1].unfold(0, block + 1, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = blocks[torch.randint(len(blocks), (8,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss  # (the model shifts the labels itself)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_all(root: Path) -> dict[str, Path]:
    """Build every fixture model under `root`; return {name: folder}."""
    root = Path(root)
    bpe = byte_level_tokenizer()
    bert = bert_char_tokenizer()
    return {
        "bpe": save_gpt2(root / "tiny-bpe", bpe),
        "bert": save_gpt2(root / "tiny-bert", bert, eos_token_id=bert.sep_token_id),
        "short": save_gpt2(root / "tiny-short", bpe, n_positions=24, seed=1),
    }


def model_copy(source: Path, folder: Path, *, transformers_path: bool = False) -> Path:
    """A copy of a fixture whose LayerNorms have random weights and biases (the fixtures' are 1 and 0,
    under which a LayerNorm skipped or applied twice goes unnoticed). `transformers_path`: also a GPT-2
    variant gptcli's own forward does not run, so gptcli loads it through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
    if transformers_path:
        model.config.scale_attn_by_inverse_layer_idx = True
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


# The prompts the lens and attention tests look inside, one per model of `traced_folders` (conftest).
TRACED_PROMPTS = {
    "bpe": "今天天气很好，我们去 the park",
    "bert": "今天天气很好，我们去公园",
    "hf": "The weather is nice today",
}


def reference_model(lm):
    """transformers' own model of a loaded model's folder, to compare gptcli's numbers with: `lm.model`
    when transformers runs it, else loaded here (once per loaded model), on its device, in its dtype."""
    if lm.runtime == "transformers":
        return lm.model
    cached = _REFERENCES.get(id(lm))
    if cached is None or cached[0] is not lm:
        from gptcli.loading.models import load_transformers_model

        cached = _REFERENCES[id(lm)] = (lm, load_transformers_model(lm.path, lm.device, lm.dtype))
    return cached[1]


_REFERENCES: dict[int, tuple[object, object]] = {}


def on_transformers(lm):
    """The same loaded model run by transformers instead of gptcli's GPT-2 (runtime "transformers")."""
    import dataclasses

    return dataclasses.replace(lm, net=None, _model=reference_model(lm))
