"""Small offline tokenizers for the data and CLI tests (nothing is downloaded).

``make_tokenizer`` builds a word-level ``tokenizers.Tokenizer`` wrapped in
``transformers.PreTrainedTokenizerFast``. Every word, punctuation mark and whitespace
character is its own token and the decoder concatenates tokens as they are, so decoding
round-trips text exactly: a test can decode the labelled tokens and compare them with the
expected response text character for character.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

# ChatML, as Qwen and many instruction-tuned models use it.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PAD, EOS, BOS, UNK = "<pad>", "</s>", "<s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK, IM_START, IM_END)

# One token per word, per whitespace character and per other character.
_PIECE = r"\s|\w+|[^\w\s]"

# Everything the Alpaca and ChatML templates write, plus the words the tests use. Extra words
# come from make_tokenizer(extra_words=...).
_BASE_TEXT = """
Below is an instruction that describes a task, paired with an input that provides further
context. Write a response that appropriately completes the request.
### Instruction: Input: Response:
system user assistant
You are a helpful bot. Say hi Hi hello Hello there again and bye please thanks ok yes no
Add two numbers 1 2 3 4 5 6 7 8 9 0 sum is the answer what how why who ? ! ' " - + = _
a b c d e f g h i j k l m n o p q r s t u v w x y z
alpha beta gamma delta long short word words
"""


def vocabulary(extra_words: Iterable[str] = ()) -> list[str]:
    """The ordinary (non-special) tokens: the base text's pieces, whitespace and extras."""
    pieces = set(re.findall(_PIECE, _BASE_TEXT)) | {" ", "\n", "\t"}
    for word in extra_words:
        pieces.update(re.findall(_PIECE, word))
    return sorted(pieces)


def make_tokenizer(
    save_dir: str | Path | None = None,
    chat: bool = False,
    *,
    bos: bool = False,
    extra_words: Iterable[str] = (),
):
    """A word-level fast tokenizer with ``</s>`` as eos and ``<pad>`` as pad.

    Args:
        save_dir: when given, the tokenizer is saved there (created) and loaded back with
            ``AutoTokenizer.from_pretrained``, as a CLI would load it.
        chat: give it the ChatML chat template (``<|im_start|>``/``<|im_end|>`` are special
            tokens either way); otherwise it has no template and the Alpaca prompt applies.
        bos: prepend ``<s>`` when called with ``add_special_tokens=True``, like LLaMA.
        extra_words: more text whose pieces join the vocabulary (anything else is ``<unk>``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokens = list(SPECIAL_TOKENS) + vocabulary(extra_words)
    vocab = {token: index for index, token in enumerate(tokens)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.add_special_tokens(list(SPECIAL_TOKENS))
    if bos:
        raw.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    if chat:
        tokenizer.chat_template = CHATML_TEMPLATE
    if save_dir is None:
        return tokenizer
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(save_dir)
    return AutoTokenizer.from_pretrained(save_dir, local_files_only=True)
