"""Tiny Hugging Face model directories of every family ferry imports, made with `transformers`
(the tests' oracle, never a ferry dependency) from generated text: nothing is downloaded.

Every parameter and buffer is random — LayerNorm gains around 1, biases and `final_logits_bias`
non-zero — so a mapping that drops a bias or a norm cannot pass by accident.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ferry.train.datasets.text_corpus import docstring_paragraphs

WIDTH, HEADS, FFN, LAYERS, POSITIONS = 32, 4, 64, 2, 64


def corpus() -> list[str]:
    return docstring_paragraphs()[:400]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: matrices N(0, 0.2²), norms' gains 1 ± 0.2, biases N(0, 0.1²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if "norm" in name.lower() and name.endswith("weight"):
                tensor.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                tensor.copy_(0.1 * noise)
            elif "embed_positions" in name and tensor.requires_grad is False:
                continue  # Marian's sinusoids are computed, not trained
            else:
                tensor.copy_(0.2 * noise)
    model.tie_weights()
    return model.eval()


def byte_level_tokenizer(special: list[str]) -> Tokenizer:
    """A byte-level BPE (GPT-2 / RoBERTa / BART style) with `special` at ids 0…"""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def wordpiece_vocab(path: Path) -> Path:
    """A BERT vocab.txt ([PAD]=0, [UNK], [CLS], [SEP], [MASK], then word pieces)."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, show_progress=False,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    # the trainer's token set is stable but its id order is not (Rust hash-map iteration):
    # specials first, the rest sorted, so every run builds the same vocabulary
    special = trainer.special_tokens
    words = sorted(set(tokenizer.get_vocab()) - {t.content for t in special})
    path.write_text("".join(token + "\n" for token in [t.content for t in special] + words))
    return path


def unigram_tokenizer(special: list[str]) -> Tokenizer:
    """A SentencePiece-style (lowercasing, metaspace) unigram tokenizer with `special` at ids
    0… (ALBERT, XLNet)."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(corpus(), trainer=trainers.UnigramTrainer(
        vocab_size=300, special_tokens=special, unk_token="<unk>", show_progress=False))
    return tokenizer


def _labels(model_class: str, names: list[str]) -> dict:
    """Class names for the classification heads (question answering keeps its 2 outputs)."""
    if "Classification" not in model_class:
        return {}
    return {"id2label": dict(enumerate(names))}


def _save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def bert(directory: Path, model_class: str = "BertForPreTraining", **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = wordpiece_vocab(directory / "vocab.txt")
    tokenizer = transformers.BertTokenizerFast(vocab=str(vocab))
    hf_config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, num_attention_heads=HEADS,
        num_hidden_layers=LAYERS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
        **_labels(model_class, ["neg", "neu", "pos"]), **config)
    model = randomise(getattr(transformers, model_class)(hf_config))
    return _save(model, tokenizer, directory)


def albert(directory: Path, model_class: str = "AlbertForMaskedLM", **config) -> Path:
    """ALBERT: 32-wide embeddings projected to a 48-wide model whose 4 layers share 2 sets of
    weights, a SentencePiece-style (metaspace) unigram tokenizer with [CLS] $A [SEP] pairs in
    segment 1."""
    from tokenizers import processors

    special = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    backend = unigram_tokenizer(special)
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = transformers.AlbertTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]")
    hf_config = transformers.AlbertConfig(
        vocab_size=len(tokenizer), embedding_size=32, hidden_size=48, num_attention_heads=HEADS,
        num_hidden_layers=4, num_hidden_groups=2, intermediate_size=FFN,
        max_position_embeddings=POSITIONS, pad_token_id=0,
        **_labels(model_class, ["neg", "neu", "pos"]), **config)
    model = randomise(getattr(transformers, model_class)(hf_config))
    return _save(model, tokenizer, directory)


def xlnet(directory: Path, model_class: str = "XLNetLMHeadModel", **config) -> Path:
    """XLNet: relative attention with 8 states of memory, a SentencePiece-style unigram
    tokenizer ending each input with `<sep> <cls>` (`<cls>` in segment 2, as XLNet's does) and
    padding on the left."""
    special = ["<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>"]
    backend = unigram_tokenizer(special)
    # transformers builds XLNet's pipeline (normaliser, metaspace, `$A <sep> <cls>`) itself
    # around the trained pieces
    pieces = [tuple(piece) for piece in json.loads(backend.to_str())["model"]["vocab"]]
    tokenizer = transformers.XLNetTokenizer(vocab=pieces, do_lower_case=True)
    hf_config = transformers.XLNetConfig(
        vocab_size=len(tokenizer), d_model=WIDTH, n_head=HEADS, n_layer=LAYERS, d_inner=FFN,
        mem_len=8, pad_token_id=tokenizer.pad_token_id,
        **_labels(model_class, ["neg", "neu", "pos"]), **config)
    model = randomise(getattr(transformers, model_class)(hf_config))
    return _save(model, tokenizer, directory)


def roberta(directory: Path, model_class: str = "RobertaForMaskedLM", **config) -> Path:
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = transformers.RobertaTokenizerFast(
        tokenizer_object=_with_post_processor(byte_level_tokenizer(special), "roberta"),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", sep_token="</s>", cls_token="<s>")
    hf_config = transformers.RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=WIDTH, num_attention_heads=HEADS,
        num_hidden_layers=LAYERS, intermediate_size=FFN, max_position_embeddings=POSITIONS + 2,
        type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        layer_norm_eps=1e-5, **_labels(model_class, ["neg", "pos"]), **config)
    model = randomise(getattr(transformers, model_class)(hf_config))
    return _save(model, tokenizer, directory)


def gpt2(directory: Path, model_class: str = "GPT2LMHeadModel", **config) -> Path:
    tokenizer = transformers.GPT2TokenizerFast(
        tokenizer_object=byte_level_tokenizer(["<|endoftext|>"]),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf_config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=WIDTH, n_head=HEADS, n_layer=LAYERS,
        n_positions=POSITIONS, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        **_labels(model_class, ["neg", "pos"]), **config)
    model = randomise(getattr(transformers, model_class)(hf_config))
    return _save(model, tokenizer, directory)


def _seq2seq_config(cls, vocab_size: int, **config):
    return cls(vocab_size=vocab_size, d_model=WIDTH, encoder_layers=LAYERS,
               decoder_layers=LAYERS, encoder_attention_heads=HEADS,
               decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
               max_position_embeddings=POSITIONS, **config)


def bart(directory: Path, **config) -> Path:
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tokenizer = transformers.BartTokenizerFast(
        tokenizer_object=_with_post_processor(byte_level_tokenizer(special), "roberta"),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", sep_token="</s>", cls_token="<s>")
    hf_config = _seq2seq_config(transformers.BartConfig, len(tokenizer), **config)
    model = randomise(transformers.BartForConditionalGeneration(hf_config))
    return _save(model, tokenizer, directory)


def mbart(directory: Path, **config) -> Path:
    """mBART: pre-norm, final norms, scaled embeddings; a target-language code forced first."""
    special = ["<s>", "<pad>", "</s>", "<unk>", "en_XX", "ro_RO", "<mask>"]
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_with_post_processor(byte_level_tokenizer(special), "mbart"),
        bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>")
    hf_config = _seq2seq_config(transformers.MBartConfig, len(tokenizer), scale_embedding=True,
                                decoder_start_token_id=2, **config)
    model = randomise(transformers.MBartForConditionalGeneration(hf_config))
    model.generation_config.forced_bos_token_id = tokenizer.convert_tokens_to_ids("ro_RO")
    return _save(model, tokenizer, directory)


def marian(directory: Path, **config) -> Path:
    """Marian as opus-mt ships it: SentencePiece source/target models and a vocab.json, SiLU,
    scaled embeddings, sinusoids; the decoder starts from the pad token."""
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "corpus.txt"
    text.write_text("\n".join(corpus()))
    for side in ("source", "target"):
        sentencepiece.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(directory / side), vocab_size=250,
            model_type="unigram", character_coverage=1.0, bos_id=-1, eos_id=-1, pad_id=-1,
            unk_id=0, minloglevel=2)
        (directory / f"{side}.model").rename(directory / f"{side}.spm")
        (directory / f"{side}.vocab").unlink()
    text.unlink()
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(directory / "source.spm"))
    vocab = {"</s>": 0, "<unk>": 1}
    for i in range(1, pieces.get_piece_size()):
        vocab.setdefault(pieces.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    hf_config = _seq2seq_config(
        transformers.MarianConfig, len(vocab), activation_function="swish",
        scale_embedding=True, pad_token_id=vocab["<pad>"], eos_token_id=0,
        decoder_start_token_id=vocab["<pad>"], forced_eos_token_id=0, **config)
    model = randomise(transformers.MarianMTModel(hf_config))
    tokenizer = transformers.MarianTokenizer(
        source_spm=str(directory / "source.spm"), target_spm=str(directory / "target.spm"),
        vocab=str(directory / "vocab.json"))
    return _save(model, tokenizer, directory)


def _sentence_tokenizer(special: list[str], single: str) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE with `special` at ids 0… and the template `single` (e.g. "<s> $A"), as
    a transformers fast tokenizer naming the roles it has."""
    from tokenizers import processors

    tokenizer = byte_level_tokenizer(special)
    tokens = [t for t in single.split() if t != "$A"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, tokenizer.token_to_id(t)) for t in tokens])
    roles = {"<s>": "bos_token", "</s>": "eos_token", "<unk>": "unk_token", "<pad>": "pad_token"}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, **{roles[t]: t for t in special if t in roles})


# (HF config class, model-specific options): GQA everywhere (4 query heads, 2 key/value heads)
DECODERS = {
    # Llama 3.1's frequency scaling, with a short "pretraining" context so it changes angles
    "llama": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),  # q/k/v biases, tied head
    "qwen3": ("Qwen3Config", {"head_dim": 16}),  # q/k norms, heads wider than d_model / heads
}


# the chat markup, special tokens of the instruct models' vocabularies (one id each)
CHAT_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
               "<|im_end|>", "[INST]", "[/INST]"]
# chat templates in the style of each family's instruct models (Llama 3 headers, Mistral's
# [INST] with its role check, Qwen's ChatML with a default system prompt)
CHAT_TEMPLATES = {
    "llama": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + "
              "message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
              "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') "
                "!= (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must "
                "alternate user/assistant/user/assistant/...') }}{% endif %}{% if "
                "message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
                "{% endif %}{% endfor %}"),
    "qwen2": ("{% for message in messages %}{% if loop.first and messages[0]['role'] != "
              "'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}"
              "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|im_start|>assistant\n' }}{% endif %}"),
}


def llama_like(directory: Path, model_type: str, model_class: str, **config) -> Path:
    """A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): RMSNorm, rotary, SwiGLU, GQA."""
    tokenizer = _sentence_tokenizer(["<unk>", "<s>", "</s>", *CHAT_TOKENS], "<s> $A")
    tokenizer.pad_token = "</s>"  # (Qwen's tokenizer class would add a pad token of its own)
    tokenizer.chat_template = CHAT_TEMPLATES.get(model_type)
    config_class, options = DECODERS[model_type]
    hf_config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=WIDTH, num_attention_heads=HEADS,
        num_key_value_heads=2, num_hidden_layers=LAYERS, intermediate_size=FFN,
        max_position_embeddings=POSITIONS, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        **_labels(model_class, ["neg", "pos"]), **{**options, **config})
    model = randomise(getattr(transformers, model_class)(hf_config))
    return _save(model, tokenizer, directory)


def t5(directory: Path, *, v1_1: bool = False, **config) -> Path:
    """T5 v1.0 (ReLU, tied and rescaled output) or v1.1 / Flan-T5 (gated GELU, an output
    projection of its own, heads wider than d_model / heads); few buckets and a short maximum
    distance, so the logarithmic buckets are used on short texts."""
    from safetensors.torch import load_file, save_file

    tokenizer = _sentence_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>")
    options = {"feed_forward_proj": "gated-gelu", "d_kv": 16} if v1_1 else {"d_kv": 8}
    hf_config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=WIDTH, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **{**options, **config})
    model = randomise(transformers.T5ForConditionalGeneration(hf_config))
    _save(model, tokenizer, directory)
    if v1_1:  # transformers 5 always ties T5's output projection: untie it in the files
        weights = load_file(directory / "model.safetensors")
        weights["lm_head.weight"] = 0.2 * torch.randn(
            weights["shared.weight"].shape, generator=torch.Generator().manual_seed(7))
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        saved = json.loads((directory / "config.json").read_text())
        saved.update(tie_word_embeddings=False, scale_decoder_outputs=False)
        (directory / "config.json").write_text(json.dumps(saved))
    return directory


def _with_post_processor(tokenizer: Tokenizer, kind: str) -> Tokenizer:
    from tokenizers import processors

    if kind == "roberta":
        tokenizer.post_processor = processors.RobertaProcessing(
            ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>")))
    else:  # mBART: X </s> en_XX
        tokenizer.post_processor = processors.TemplateProcessing(
            single="$A </s> en_XX", pair="$A $B </s> en_XX",
            special_tokens=[("</s>", tokenizer.token_to_id("</s>")),
                            ("en_XX", tokenizer.token_to_id("en_XX"))])
    return tokenizer


BUILDERS = {"bert": bert, "roberta": roberta, "albert": albert, "xlnet": xlnet, "gpt2": gpt2,
            "bart": bart,
            "mbart": mbart, "marian": marian, "t5": t5, "flan-t5": partial(t5, v1_1=True),
            **{name: partial(llama_like, model_type=name) for name in DECODERS}}
