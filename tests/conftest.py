"""Shared fixtures: tiny random models built in-process (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton's CPU interpreter for the kernel tests.  It must be set before triton is first
# imported anywhere in the session (transformers imports it, and triton's own library
# functions are compiled for the mode in force then), so here, not in the kernel modules.
# TRITON_INTERPRET=0 in the environment runs them on a real GPU instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import io

import pytest
import torch
import transformers
from pypdf import PdfWriter
from pypdf.generic import ContentStream, DecodedStreamObject, DictionaryObject, NameObject


def tiny_llama(num_kv_heads: int = 2, layers: int = 2, vocab: int = 128, seed: int = 0):
    """Llama-shaped: 4 query heads, grouped-query attention (2 KV heads) or MQA (1)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def tiny_gemma3(layers: int = 4, window: int = 8, vocab: int = 128, seed: int = 0):
    """Gemma3-shaped: sliding-window layers with a full-attention layer every 2nd layer, MQA."""
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=window,
        layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)],
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        query_pre_attn_scalar=16,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def sharpen(model, factor: float = 8.0):
    """Scale query/key projections so attention is peaked (random init is near uniform),
    which makes position errors visible in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(factor)
    return model


WORDS = [f"w{i}" for i in range(40)]


def save_word_llama(path, layers: int = 2, prepare=lambda model: model):
    """Save a tiny Llama (512 positions, GQA) with a word-level tokenizer over ``WORDS`` into
    ``path``, as a hub model directory is laid out; ``prepare`` may adjust the model first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    prepare(transformers.AutoModelForCausalLM.from_config(cfg)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


class IdTokenizer:
    """Minimal tokenizer stand-in for raw-id runs on tiny models."""

    bos_token_id = 1
    eos_token_id = 2

    def encode(self, text, add_special_tokens=False):
        return [3 + (ord(c) % 100) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


class CharTokenizer(IdTokenizer):
    """IdTokenizer (one token per character) that can also be called on a batch, as the
    task generators do with Hugging Face tokenizers."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [self.encode(t) for t in texts]}


@pytest.fixture
def one_thread(request):
    """Tiny models are dominated by per-op overhead; one thread is ~10x faster on a busy
    2-core machine (a test marked slow, on the real model, keeps the default).  A module
    takes it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_eval_lm():
    """A tiny Llama (2 KV heads) with ``CharTokenizer``, wrapped for the eval suite."""
    from kvcli import api

    return api.wrap_model(tiny_llama(num_kv_heads=2), CharTokenizer())


MODEL_FACTORIES = {
    "llama-gqa": lambda: tiny_llama(num_kv_heads=2),
    "llama-mqa": lambda: tiny_llama(num_kv_heads=1),
    "gemma3": lambda: tiny_gemma3(),
}


@pytest.fixture(params=list(MODEL_FACTORIES))
def tiny_model(request):
    return request.param, sharpen(MODEL_FACTORIES[request.param]())


def make_pdf(pages: list[str], password: str | None = None) -> bytes:
    """Build a PDF in memory; each string becomes one page of Helvetica text ('' = blank page)."""
    writer = PdfWriter()
    for text in pages:
        page = writer.add_blank_page(612, 792)
        if not text:
            continue
        font = DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
            }
        )
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
        stream = DecodedStreamObject()
        stream.set_data(f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode("latin-1"))
        page.replace_contents(ContentStream(stream, writer))
    if password is not None:
        writer.encrypt(password)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
