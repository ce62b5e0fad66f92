"""Prompt templates: what goes before the document, and what follows it for a question.

The document is prefilled once; each question is appended after it and rolled back after
its answer, so a template is split into ``prefix`` (before the document) and a per-question
``suffix``.  Instruction-tuned models use their own chat template (split around a sentinel
where the document goes); base models (the embedded Gemma 3 270M) get a completion-style
template whose wording was chosen by measurement (see README, "Prompt template").
"""

from __future__ import annotations

from dataclasses import dataclass, field

_SENTINEL = "\u2063KVCLI_DOCUMENT\u2063"

SUMMARY_INSTRUCTION = "Summarize the document above in a few sentences."
# KVzip's reconstruction prompts (Kim et al. 2025): the first chunk, and a later chunk, which
# is introduced by the last few tokens before it.
RECON_FIRST = "Repeat the previous context exactly."
RECON_NEXT = "Repeat the part of the previous context exactly, starting with"


@dataclass
class Template:
    prefix: str  # text before the document
    question_format: str  # text after the document; {question} and {answer_prefix}
    summary_suffix: str
    add_bos: bool
    stop_answer: list[str] = field(default_factory=list)
    stop_summary: list[str] = field(default_factory=list)

    def prefix_ids(self, tokenizer) -> list[int]:
        """Token ids that go before the document: BOS where the template wants it, then ``prefix``."""
        ids = [tokenizer.bos_token_id] if self.add_bos and tokenizer.bos_token_id is not None else []
        return ids + (tokenizer.encode(self.prefix, add_special_tokens=False) if self.prefix else [])

    def question(self, question: str, answer_prefix: str = "") -> str:
        text = self.question_format.format(question=question.strip())
        return text + (" " + answer_prefix.strip() if answer_prefix else "")

    def reconstruction(self) -> tuple[str, str, str]:
        """The repeat prompt asked like a question: ``(first, next_head, next_tail)``: the text
        before the first chunk; for a later chunk, the text before the overlap tokens (the end of
        the previous chunk) and the text between them and the chunk."""
        before, after = self.question_format.split("{question}", 1)
        return before + RECON_FIRST + after, before + RECON_NEXT, after


COMPLETION = Template(
    prefix="",
    question_format="\n\nQuestion: {question}\nAnswer:",
    summary_suffix="\n\nSummary of the document above:\n",
    add_bos=True,
    stop_answer=["\n"],
    stop_summary=["\n\n"],
)


def chat_template(tokenizer) -> Template:
    """Split the model's chat template around the document."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{_SENTINEL}\n\n{{question}}"}], tokenize=False, add_generation_prompt=True
    )
    prefix, suffix = rendered.split(_SENTINEL, 1)
    summary = suffix.replace("{question}", SUMMARY_INSTRUCTION)
    return Template(prefix=prefix, question_format=suffix, summary_suffix=summary, add_bos=False)


def choose_template(tokenizer, is_base: bool) -> Template:
    if not is_base and getattr(tokenizer, "chat_template", None):
        try:
            return chat_template(tokenizer)
        except Exception:  # a template that cannot be split falls back to plain completion
            pass
    return COMPLETION
