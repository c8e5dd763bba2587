"""The offline byte tokenizer: every byte one token, template markers whole, ids < 512."""
from transformers import AutoTokenizer

from engine.data.byte_tokenizer import byte_tokenizer


def test_every_byte_is_one_token_and_round_trips():
    tokenizer = byte_tokenizer()
    text = "héllo wörld\t€ 🚀\n{json}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_specials_words_and_markers_are_single_ids_below_512():
    tokenizer = byte_tokenizer()
    assert len(tokenizer) <= 512 and max(tokenizer.get_vocab().values()) < 512
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
    assert len({tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}) == 4
    for token in ("yes", "no", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<eos>"):
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert ids == [tokenizer.convert_tokens_to_ids(token)] and ids[0] != tokenizer.unk_token_id


def test_no_special_tokens_are_added_by_default():
    tokenizer = byte_tokenizer()
    assert tokenizer("ab")["input_ids"] == tokenizer("ab", add_special_tokens=False)["input_ids"]


def test_save_and_reload(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\nis it yes or no?<|im_end|>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.eos_token_id == tokenizer.eos_token_id and reloaded.pad_token_id == tokenizer.pad_token_id
