"""data=tldr: Reddit TL;DR posts and their summaries (the seeds' "SUBREDDIT: ... TL;DR:" prompt), and
the judged summary pairs of "learning to summarize from human feedback"."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig

from rlhf_exp.data.disk_cache import digest, read_json, tokenizer_hash, write_json
from rlhf_exp.data.formats.base import DataFormat, PreferenceExample, SFTExample
from rlhf_exp.data.sources import Record, read_csv, read_hub, read_jsonl, vendored
from rlhf_exp.data.tokens import NO_TEMPLATE, bos_prefix
from rlhf_exp.errors import ConfigError, DataError

log = logging.getLogger(__name__)

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
