"""Training a byte-level BPE tokenizer and saving it in the HuggingFace format.

The `tokenizers` library does the training; what is ours is the choice of pieces:
NFKC normalisation, byte-level pre-tokenisation (every byte string is representable, so
no text is ever <unk>), the five special tokens at fixed ids, and a ChatML template.
"""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, IM_START, IM_END = "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, IM_START, IM_END]  # ids 0..4, in this order

# ChatML. The {% generation %} markers let `apply_chat_template(...,
# return_assistant_tokens_mask=True)` mark the assistant replies (and the <|im_end|> that
# closes each), which is exactly what SFT trains on.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

NORMALIZERS = {"nfkc": normalizers.NFKC, "none": None}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                        normalization: str = "nfkc", model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on a stream of texts and wrap it as a HuggingFace fast tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    if NORMALIZERS[normalization] is not None:
        tokenizer.normalizer = NORMALIZERS[normalization]()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_for_transformers(tokenizer, model_max_length)


def wrap_for_transformers(tokenizer: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    # pad is <unk>, not </s>: collators that mask padding in the labels would otherwise
    # also mask every real end-of-sequence token, and the model would never learn to stop.
    # clean_up_tokenization_spaces=False keeps decode(encode(text)) == text (the clean-up
    # rewrites " ." to "." and breaks exact round trips of code and prose).
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
