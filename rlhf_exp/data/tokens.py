"""What a tokenizer does that the data must follow: the BOS its own encoding adds, and the token a chat
template ends a turn with. Found by tokenizing once per tokenizer."""

from __future__ import annotations

import weakref

# per tokenizer: what its own encoding adds and how its chat turns end (tokenizing to find out is not free)
_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_END_OF_TURN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] where the tokenizer's own encoding starts every text with it (Llama-2, Mistral), else []."""
    if tokenizer not in _BOS:
        bos = tokenizer.bos_token_id
        adds = bos is not None and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos]
        _BOS[tokenizer] = [bos] if adds else []
    return _BOS[tokenizer]


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template ends an assistant turn with (<|im_end|>, Llama-3's <|eot_id|>, Gemma's
    <end_of_turn>), which is not always the EOS (Qwen2.5 base: EOS <|endoftext|>); EOS without a template."""
    if tokenizer not in _END_OF_TURN:
        found = tokenizer.eos_token_id
        if getattr(tokenizer, "chat_template", None):
            reply = "Q7x reply Q7x"
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": reply}], tokenize=False)
            after = tokenizer(text.split(reply, 1)[1], add_special_tokens=False).input_ids
            special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
            found = next((i for i in after[:2] if i in special), found)
        _END_OF_TURN[tokenizer] = found
    return _END_OF_TURN[tokenizer]


def stop_token_ids(tokenizer, chat: bool) -> list[int]:
    """What ends a response: EOS, and for chat data also the template's end of turn."""
    end = end_of_turn_id(tokenizer) if chat else tokenizer.eos_token_id
    return [tokenizer.eos_token_id] + ([end] if end != tokenizer.eos_token_id else [])


def encode_prompt(text: str, tokenizer, max_tokens: int) -> list[int]:
    """Prompt ids, cut from the front to `max_tokens` (long prompts keep their end), with the tokenizer's
    BOS first where its encoding adds one and the text does not already start with it. An empty prompt of a
    tokenizer without BOS (Qwen) is the EOS alone, as a sequence start: a response's first token is then
    predicted from it, in a row of its own or packed behind it (with no prompt token at all a packed row read
    the row before's last hidden state)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    bos = bos_prefix(tokenizer)
    if bos and ids[:1] == bos:
        bos = []
    keep = max(max_tokens - len(bos), 0)
    prompt = bos + (ids[max(len(ids) - keep, 0):] if keep else [])
    return prompt if prompt or max_tokens < 1 else [tokenizer.eos_token_id]


# ChatML (the template SmolLM2 and Qwen use) for a base model whose tokenizer has none: data.chat_template=chatml
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")


NO_TEMPLATE = "none"  # data.chat_template=none: dialogues as plain text (HH-RLHF's "\n\nHuman: ..."), no template


def with_chat_template(tokenizer, data_cfg):
    """The tokenizer with `data.chat_template` in place of its own (chatml, or a Jinja file); as it was for null
    and none (which the formats read: no template at all)."""
    from pathlib import Path

    from rlhf_exp.errors import ConfigError

    spec = data_cfg.get("chat_template")
    if not spec or spec == NO_TEMPLATE:
        return tokenizer
    if spec == "chatml":
        template = CHATML_TEMPLATE
    else:
        path = Path(str(spec)).expanduser()
        if not path.is_file():
            raise ConfigError("data.chat_template", f"{spec!r} is neither chatml nor a Jinja template file")
        template = path.read_text(encoding="utf-8")
    tokenizer.chat_template = template
    _END_OF_TURN.pop(tokenizer, None)
    return tokenizer
