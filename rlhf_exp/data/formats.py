"""How raw records become prompts and responses, one class per `data.format`.

Each format yields text examples; tokenization and padding live in `rlhf_exp.data.collate`.
Responses exclude the EOS token, which the tokenizer step appends as an id.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from omegaconf import DictConfig

from rlhf_exp.data.disk_cache import digest, read_json, tokenizer_hash, write_json
from rlhf_exp.data.tokens import NO_TEMPLATE, bos_prefix
from rlhf_exp.data.sources import Record, read_csv, read_hub, read_json_or_jsonl, read_jsonl, vendored
from rlhf_exp.errors import ConfigError, DataError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    completion: str
    origin: str = ""
    # the data row's other columns (an `answer`, a `solution`), which reward functions read by name as TRL passes
    # them; a conversational prompt's messages under "prompt" (reward functions get those, not the rendered text)
    row: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def split_key(self) -> str:
        """What keeps rows together in a split: the prompt (its rows never straddle train and held-out)."""
        return self.prompt


@dataclass(frozen=True)
class Document(SFTExample):
    """A text modelled whole (TRL's standard language modelling): its prompt is only the start-of-document
    token, so each document is its own group in a split."""

    @property
    def split_key(self) -> str:
        return self.prompt + self.completion


@dataclass(frozen=True)
class PreferenceExample:
    prompt: str
    chosen: str
    rejected: str
    origin: str = ""

    @property
    def split_key(self) -> str:
        return self.prompt


class DataFormat:
    """Base: subclasses implement the kinds of examples their data has."""

    #: responses are chat turns (they end with the template's end-of-turn token, not EOS)
    chat = False
    #: the data has turns a chat template can render (whether it does: `chat`)
    has_turns = False

    def __init__(self, cfg: DictConfig, tokenizer, cache_dir: str | Path | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.skipped: Counter[str] = Counter()  # bad rows dropped under data.on_bad_row=skip, by reason

    def bad(self, error: DataError) -> None:
        """A bad row: stop naming file and line (data.on_bad_row=error), or count it and go on (skip)."""
        if self.cfg.get("on_bad_row", "error") != "skip":
            raise error
        if not self.skipped:
            log.warning("skipping bad rows (data.on_bad_row=skip), the first: %s", error)
        self.skipped[error.reason] += 1

    def collect(self, records: Iterable[Record], make: Callable[[Record], T]) -> list[T]:
        """`make(record)` for each record; a DataError it raises is a bad row (see `bad`)."""
        out = []
        for rec in records:
            try:
                out.append(make(rec))
            except DataError as error:
                self.bad(error)
        return out

    def sft_examples(self) -> list[SFTExample]:
        raise ConfigError("data", f"data={self.cfg.name} has no SFT examples")

    def preference_examples(self) -> list[PreferenceExample]:
        raise ConfigError("data", f"data={self.cfg.name} has no preference pairs")

    def prompt_examples(self) -> list[SFTExample]:
        """Prompts to sample from (GRPO, PPO, eval), each with its reference response."""
        return self.sft_examples()

    def chat_prompt(self, messages: list[dict], where: str) -> str:
        """Chat messages as a prompt: the template with the assistant's header; refused naming the key where
        there is no template (the tokenizer has none, or data.chat_template=none). `where`: what needs it."""
        if not uses_chat_template(self.cfg, self.tokenizer):
            raise ConfigError("data.chat_template", f"{where} is conversational and there is no chat template "
                              "(the tokenizer has none, or data.chat_template=none): set data.chat_template=chatml "
                              "(or a .jinja file)")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _hub_spec(self, kind: str):
        spec = (self.cfg.get("hub") or {}).get(kind)
        if spec is None:
            raise ConfigError(f"data.hub.{kind}", f"data={self.cfg.name} names no hub source for {kind} data")
        return spec

    def _file(self) -> str:
        if not self.cfg.get("path"):
            raise ConfigError("data.path", f"data.source=file needs data.path (data={self.cfg.name})")
        return self.cfg.path


# --------------------------------------------------------------------------- TL;DR

TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
_TLDR_QUERY = re.compile(r"^SUBREDDIT: r/(?P<subreddit>.*?)\n\nTITLE: (?P<title>.*?)\n\nPOST: (?P<post>.*)\n\nTL;DR:$", re.S)


def tldr_prompt(subreddit: str, title: str, post: str, tokenizer, max_tokens: int) -> str:
    """The TL;DR query, the post cut at its last newline (repeatedly) until it fits `max_tokens`.

    As in the published pipelines (Stiennon et al. 2020; Huang et al. 2024, "The N+
    implementation details"). A post with no newline left is cut at a token boundary.
    """

    def render(text: str) -> str:
        return TLDR_TEMPLATE.format(subreddit=subreddit, title=title, post=text.strip())

    def length(text: str) -> int:
        return len(tokenizer(render(text), add_special_tokens=False).input_ids)

    title, post = title.strip(), post.strip()
    while length("") > max_tokens * 3 // 4 and title:  # a title too long for the budget: cut it by tokens
        title_ids = tokenizer(title, add_special_tokens=False).input_ids
        title = tokenizer.decode(title_ids[: len(title_ids) * 3 // 4]).strip()
    overhead = length("")
    if overhead > max_tokens:
        raise ConfigError("data.max_prompt_tokens", f"{max_tokens} tokens cannot hold the TL;DR template")
    if length(post) <= max_tokens:
        return render(post)
    # Cutting at the last newline until it fits = keeping the longest newline-ended prefix that fits.
    # Tokens grow with the prefix, so a binary search finds it in log(newlines) tokenizations
    # (a linear scan from the end took ~10 per post at 64 tokens: most of a small run's start-up).
    prefixes = sorted({post[:at].rstrip() for at, char in enumerate(post) if char == "\n"}, key=len)
    fitting, low, high = None, 0, len(prefixes) - 1
    while low <= high:
        middle = (low + high) // 2
        if length(prefixes[middle]) <= max_tokens:
            fitting, low = prefixes[middle], middle + 1
        else:
            high = middle - 1
    if fitting is not None:
        return render(fitting)
    post = prefixes[0] if prefixes else post  # no newline cut fits: cut the first paragraph by tokens
    ids = tokenizer(post, add_special_tokens=False).input_ids
    keep = max_tokens - overhead
    # decode-then-encode can merge tokens differently: step back until it fits
    while keep > 0 and length(tokenizer.decode(ids[:keep])) > max_tokens:
        keep -= 1
    return render(tokenizer.decode(ids[:keep]) if keep > 0 else "")


# Fitting the posts tokenizes each several times: ~9 s for the 2,445 vendored posts, at the start of
# every TL;DR run. Runs in one process (a Hydra multirun, the tests) ask for the same prompts again, so
# they are kept per tokenizer and budget, and on disk under paths.cache_dir for the next process.
# The key hashes the tokenizer itself, the template and the fitting rule (bump _TLDR_FIT_VERSION
# when tldr_prompt changes).
_TLDR_PROMPTS: dict[tuple[str, int], dict[tuple[str, str, str], str]] = {}
_TLDR_PROMPT_BUDGETS_KEPT = 4
_TLDR_FIT_VERSION = "1"


def _tldr_key(tokenizer, max_tokens: int) -> tuple[str, int] | None:
    fingerprint = tokenizer_hash(tokenizer)
    if fingerprint is None:  # a slow tokenizer: no memo
        return None
    return digest([fingerprint, TLDR_TEMPLATE, _TLDR_FIT_VERSION]), int(max_tokens)


def _tldr_prompt_memo(tokenizer, max_tokens: int) -> dict[tuple[str, str, str], str]:
    key = _tldr_key(tokenizer, max_tokens)
    if key is None:
        return {}
    if key not in _TLDR_PROMPTS:
        while len(_TLDR_PROMPTS) >= _TLDR_PROMPT_BUDGETS_KEPT:
            _TLDR_PROMPTS.pop(next(iter(_TLDR_PROMPTS)))
        _TLDR_PROMPTS[key] = {}
    return _TLDR_PROMPTS[key]


def _tldr_cache_file(cache_dir: str | Path | None, tokenizer, max_tokens: int) -> Path | None:
    key = _tldr_key(tokenizer, max_tokens)
    if cache_dir is None or key is None:
        return None
    return Path(cache_dir) / "tldr_prompts" / f"{key[0][:24]}_{key[1]}.json"


def load_tldr_prompts(path: Path | None, memo: dict) -> None:
    """Prompts fitted by an earlier process (a broken file is ignored: they are fitted again)."""
    if memo:
        return
    kept = read_json(path)
    try:
        memo.update({(s, t, p): prompt for s, t, p, prompt in kept or []})
    except (ValueError, TypeError) as error:
        log.warning("ignoring %s (%s); fitting the TL;DR prompts again", path, error)


def save_tldr_prompts(path: Path | None, memo: dict) -> None:
    if memo:
        write_json(path, [[*key, prompt] for key, prompt in memo.items()])


class TldrFormat(DataFormat):
    def __init__(self, cfg: DictConfig, tokenizer, cache_dir: str | Path | None = None):
        super().__init__(cfg, tokenizer)
        if cfg.get("chat_template") not in (None, NO_TEMPLATE):
            log.info("data=tldr keeps the seeds' plain 'SUBREDDIT: ... TL;DR:' prompt: data.chat_template=%s is not "
                     "used (TL;DR has no turns)", cfg.chat_template)
        self._prompts = _tldr_prompt_memo(tokenizer, cfg.max_prompt_tokens)
        self._cache_file = _tldr_cache_file(cache_dir, tokenizer, cfg.max_prompt_tokens)
        load_tldr_prompts(self._cache_file, self._prompts)
        self._known = len(self._prompts)

    def _keep_prompts(self) -> None:
        if len(self._prompts) > self._known:
            save_tldr_prompts(self._cache_file, self._prompts)
            self._known = len(self._prompts)

    def _posts(self) -> Iterator[tuple[Record, dict]]:
        """(record, {subreddit, title, post, summary}) from the configured source."""
        if self.cfg.source == "vendored":
            for rec in read_jsonl(vendored("tldr/tldr-posts-500.jsonl.gz")):
                yield rec, dict(subreddit=rec.get("subreddit"), title=rec.get("title"),
                                post=rec.get("instruction"), summary=rec.get("gold_response"))
            for rec in read_csv(vendored("tldr/oai1b-judged.csv.gz")):
                yield rec, dict(self._parse_query(rec), summary=rec.get("reference_responses"))
        elif self.cfg.source == "hub":
            for rec in read_hub(self._hub_spec("sft"), "data.hub.sft"):
                yield rec, dict(subreddit=rec.get("subreddit"), title=rec.get("title"),
                                post=rec.get("post"), summary=rec.get("summary"))
        else:
            raise ConfigError("data.source", f"data=tldr reads vendored or hub, not {self.cfg.source!r}")

    @staticmethod
    def _parse_query(rec: Record) -> dict:
        match = _TLDR_QUERY.match(rec.get("query"))
        if match is None:
            raise DataError(rec.path, "query is not in the SUBREDDIT/TITLE/POST/TL;DR: format", rec.line)
        return match.groupdict()

    def _prompt(self, fields: dict) -> str:
        key = (fields["subreddit"], fields["title"], fields["post"])
        if key not in self._prompts:  # room for the BOS the tokenizer may put first (data.collate.encode_prompt)
            budget = self.cfg.max_prompt_tokens - len(bos_prefix(self.tokenizer))
            self._prompts[key] = tldr_prompt(*key, self.tokenizer, budget)
        return self._prompts[key]

    def sft_examples(self) -> list[SFTExample]:
        seen, out = set(), []
        for rec, fields in self._posts():
            prompt = self._prompt(fields)
            if prompt in seen:  # the same post twice: keep one
                continue
            seen.add(prompt)
            out.append(SFTExample(prompt, " " + fields["summary"].strip(), rec.origin))
        self._keep_prompts()
        return out

    def preference_examples(self) -> list[PreferenceExample]:
        out = []
        if self.cfg.source == "vendored":
            for rec in read_csv(vendored("tldr/oai1b-judged.csv.gz")):
                preferred = rec.get("preferred")
                if preferred not in ("ours", "reference"):
                    continue  # not judged
                policy, human = rec.get("postprocessed_response").strip(), rec.get("reference_responses").strip()
                chosen, rejected = (policy, human) if preferred == "ours" else (human, policy)
                out.append(PreferenceExample(self._prompt(self._parse_query(rec)), " " + chosen, " " + rejected, rec.origin))
        elif self.cfg.source == "hub":
            for rec in read_hub(self._hub_spec("preference"), "data.hub.preference"):
                info, summaries, choice = rec.get("info"), rec.get("summaries"), rec.get("choice")
                prompt = self._prompt(dict(subreddit=info.get("subreddit") or "", title=info.get("title") or "",
                                           post=info.get("post") or info.get("article") or ""))
                chosen, rejected = summaries[choice]["text"], summaries[1 - choice]["text"]
                out.append(PreferenceExample(prompt, " " + chosen.strip(), " " + rejected.strip(), rec.origin))
        else:
            raise ConfigError("data.source", f"data=tldr reads vendored or hub, not {self.cfg.source!r}")
        self._keep_prompts()
        return out


# --------------------------------------------------------------------------- HH-RLHF

ASSISTANT_TAG = "\n\nAssistant:"


_TURN = re.compile(r"\n\n(Human|Assistant):")


def dialogue_messages(prompt: str) -> list[dict]:
    """An HH-RLHF prompt ("\n\nHuman: ...\n\nAssistant: ...\n\nAssistant:") as chat messages, without the
    empty assistant turn it ends with."""
    parts = _TURN.split(prompt)  # [before, role, text, role, text, ...]
    turns = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
             for role, text in zip(parts[1::2], parts[2::2])]
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns = turns[:-1]
    return turns


def split_dialogue(text: str) -> tuple[str, str] | None:
    """HH-RLHF dialogue -> (prompt up to and including the last "\\n\\nAssistant:", the reply)."""
    cut = text.rfind(ASSISTANT_TAG)
    if cut < 0:
        return None
    cut += len(ASSISTANT_TAG)
    return text[:cut], text[cut:]


class HhRlhfFormat(DataFormat):
    """HH-RLHF dialogues as chat messages through the tokenizer's chat template (the responses then end with its
    end of turn), as every format with turns is; the plain "\n\nHuman: ... \n\nAssistant:" text with
    data.chat_template=none or a tokenizer without a template (a base model, as the seeds' Pythia)."""

    has_turns = True

    @property
    def chat(self) -> bool:
        return uses_chat_template(self.cfg, self.tokenizer)

    def _records(self) -> Iterator[Record]:
        if self.cfg.source == "vendored":
            for subset in self.cfg.subsets:
                path = vendored(f"hh-rlhf/{subset}.test.jsonl.gz")
                if not path.is_file():
                    raise ConfigError("data.subsets", f"unknown subset {subset!r} (no {path.name})")
                yield from read_jsonl(path, self.bad)
        elif self.cfg.source == "hub":
            yield from read_hub(self._hub_spec("preference"), "data.hub.preference")
        elif self.cfg.source == "file":
            yield from read_jsonl(self._file(), self.bad)
        else:
            raise ConfigError("data.source", f"unknown source {self.cfg.source!r}")

    def preference_examples(self) -> list[PreferenceExample]:
        out = []
        for rec in self._records():
            chosen, rejected = split_dialogue(rec.get("chosen")), split_dialogue(rec.get("rejected"))
            if chosen is None or rejected is None:
                raise DataError(rec.path, "dialogue has no '\\n\\nAssistant:' turn", rec.line)
            if chosen[0] != rejected[0] or chosen[1] == rejected[1]:
                continue  # differing prompts or identical replies carry no preference
            if self.chat:
                prompt = self.chat_prompt(dialogue_messages(chosen[0]), rec.origin)
                out.append(PreferenceExample(prompt, chosen[1].strip(), rejected[1].strip(), rec.origin))
            else:
                out.append(PreferenceExample(chosen[0], chosen[1], rejected[1], rec.origin))
        return out

    def sft_examples(self) -> list[SFTExample]:
        return [SFTExample(p.prompt, p.chosen, p.origin) for p in self.preference_examples()]


# --------------------------------------------------------------------------- checks of user-written rows


def checked_sft(example: SFTExample, rec: Record) -> SFTExample:
    if not example.completion.strip():
        raise DataError(rec.path, "empty completion (nothing to learn)", rec.line, reason="empty response")
    return example


def checked_pair(pair: PreferenceExample, rec: Record) -> PreferenceExample:
    """A pair that teaches a preference: two non-empty responses that differ."""
    if not pair.chosen.strip() or not pair.rejected.strip():
        which = "chosen" if not pair.chosen.strip() else "rejected"
        raise DataError(rec.path, f"empty {which} response", rec.line, reason="empty response")
    if pair.chosen == pair.rejected:
        raise DataError(rec.path, "chosen and rejected are identical (no preference to learn)", rec.line,
                        reason="chosen == rejected")
    return pair


# --------------------------------------------------------------------------- JSON lines


class JsonlFormat(DataFormat):
    DEFAULT_FILE = "examples/hh_pairs_sample.jsonl"

    def _records(self) -> Iterator[Record]:
        if self.cfg.source == "hub":  # it used to read the vendored sample instead
            raise ConfigError("data.source", "data=jsonl reads a local file (data.path); for a hub data set use "
                              "data=hub data.path=<hub id> [data.name=... data.split=... data.columns.<x>=...]")
        return read_jsonl(self.cfg.get("path") or vendored(self.DEFAULT_FILE), self.bad)

    def _field(self, rec: Record, name: str) -> str:
        field = self.cfg.fields[name]
        value = rec.get(field, hint=f"data.fields.{name}")
        if not isinstance(value, str):
            raise DataError(rec.path, f"field {field!r} must be a string, got {type(value).__name__}", rec.line)
        return value

    def sft_examples(self) -> list[SFTExample]:
        return self.collect(self._records(), lambda r: checked_sft(
            SFTExample(self._field(r, "prompt"), self._field(r, "completion"), r.origin), r))

    def preference_examples(self) -> list[PreferenceExample]:
        return self.collect(self._records(), lambda r: checked_pair(
            PreferenceExample(self._field(r, "prompt"), self._field(r, "chosen"), self._field(r, "rejected"), r.origin), r))


# --------------------------------------------------------------------------- ShareGPT / messages

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
          "bot": "assistant", "model": "assistant"}


def to_message(turn: dict, rec: Record) -> dict:
    """A ShareGPT turn ({"from", "value"}) or a chat message ({"role", "content"}) as a chat message."""
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if role not in _ROLES or not isinstance(content, str):
        raise DataError(rec.path, f"turn {turn!r:.80} needs from/value or role/content", rec.line)
    return {"role": _ROLES[role], "content": content}


class ShareGptFormat(DataFormat):
    chat = True
    has_turns = True

    def _records(self) -> Iterator[Record]:
        if self.cfg.source == "vendored":
            return read_json_or_jsonl(vendored("sharegpt-demo/dpo_en_demo.json.gz"), self.bad)
        if self.cfg.source == "hub":
            return read_hub(self._hub_spec("preference"), "data.hub.preference")
        if self.cfg.source == "file":
            return read_json_or_jsonl(self._file(), self.bad)
        raise ConfigError("data.source", f"unknown source {self.cfg.source!r}")

    def _conversation(self, rec: Record) -> list[dict]:
        turns = rec.data.get("conversations", rec.data.get("messages"))
        if not isinstance(turns, list) or not turns:
            raise DataError(rec.path, "needs a non-empty 'conversations' (or 'messages') list", rec.line)
        return [to_message(t, rec) for t in turns]

    def _prompt(self, messages: list[dict]) -> str:
        return self.chat_prompt(messages, f"data={self.cfg.name}")

    def _sft_example(self, rec: Record) -> SFTExample:
        messages = self._conversation(rec)
        if "chosen" in rec.data:
            reply = to_message(rec.data["chosen"], rec)["content"]
        elif messages[-1]["role"] == "assistant":
            messages, reply = messages[:-1], messages[-1]["content"]
        else:
            raise DataError(rec.path, "no assistant reply: the last turn is not the assistant's and there is no "
                            "'chosen'", rec.line, reason="no assistant reply")
        return checked_sft(SFTExample(self._prompt(messages), reply, rec.origin), rec)

    def _pair(self, rec: Record) -> PreferenceExample:
        prompt = self._prompt(self._conversation(rec))
        chosen = to_message(rec.get("chosen"), rec)["content"]
        rejected = to_message(rec.get("rejected"), rec)["content"]
        return checked_pair(PreferenceExample(prompt, chosen, rejected, rec.origin), rec)

    def sft_examples(self) -> list[SFTExample]:
        return self.collect(self._records(), self._sft_example)

    def preference_examples(self) -> list[PreferenceExample]:
        return self.collect(self._records(), self._pair)


def uses_chat_template(cfg: DictConfig, tokenizer) -> bool:
    """Whether data with turns goes through a chat template: the tokenizer has one (or data.chat_template set
    it) and data.chat_template is not none."""
    return cfg.get("chat_template") != NO_TEMPLATE and bool(getattr(tokenizer, "chat_template", None))
