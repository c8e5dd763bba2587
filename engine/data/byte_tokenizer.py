"""A tiny byte-level tokenizer for tests and random-init models, built offline.

Every byte is one token, so any text tokenizes without a vocabulary file and without the
hub. On top of the 256 bytes it knows what the templates need: the specials `<pad>`,
`<eos>`, `<bos>`, `<unk>`; the words "yes" and "no" as real BPE tokens (so a reranker's
yes/no logits have a single id each and "yes" in text tokenizes to that id, as in Qwen);
and Qwen's chat markers as added tokens (so the Qwen3-Reranker template tokenizes the way
it does for Qwen: one id per marker). All ids stay below 512, the vocab size of the tiny
test models.

Layout: 0-3 specials, 4-259 bytes, then "ye" (a merge step towards "yes"), "yes", "no",
then the four Qwen markers.
"""
from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
QWEN_SPECIAL_MARKERS = ("<|im_start|>", "<|im_end|>")  # special in Qwen: never split, skippable on decode
QWEN_PLAIN_MARKERS = ("<think>", "</think>")  # added but not special in Qwen3
# BPE merges that build "yes" and "no" out of bytes; "ye" is the intermediate token.
WORD_MERGES = (("y", "e"), ("ye", "s"), ("n", "o"))
VOCAB_LIMIT = 512  # the tiny test models' vocab_size


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE uses for raw bytes, in byte order."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    # alphabet() is unordered; GPT-2's byte-to-unicode table fixes the order by byte value.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    ordered = [table[b] for b in range(256)]
    assert set(ordered) == set(alphabet), "byte-level alphabet changed in this tokenizers version"
    return ordered


def _vocabulary() -> dict[str, int]:
    tokens = list(SPECIAL_TOKENS) + _byte_alphabet()
    tokens += [left + right for left, right in WORD_MERGES]
    tokens += list(QWEN_SPECIAL_MARKERS) + list(QWEN_PLAIN_MARKERS)
    vocab = {token: index for index, token in enumerate(tokens)}
    assert len(vocab) == len(tokens) <= VOCAB_LIMIT
    return vocab


def byte_tokenizer():
    """A transformers fast tokenizer (eos `<eos>`, pad `<pad>`); `save_pretrained` works."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _vocabulary()
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(WORD_MERGES), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Added tokens reuse their vocabulary ids, so the layout above is what the model sees.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_MARKERS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN_MARKERS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<eos>",
        pad_token="<pad>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=1 << 30,
    )
