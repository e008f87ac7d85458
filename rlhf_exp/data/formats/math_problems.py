"""Problems with checkable answers: generated arithmetic (data=arithmetic) and GSM8K (data=gsm8k).

Each prompt carries its exact `answer` in its data row, which `reward=math` (rlhf_exp/rewards/verifiable.py) checks
the completion's final number against, as TRL passes a data set's `answer` column to a reward function. The
question is a user turn through the tokenizer's chat template when it has one (SmolLM2-Instruct, Qwen2.5-
Instruct), else plain "Question: ...\nAnswer:" text (a base model). An SFT example is the question with its
worked answer (GSM8K's reasoning, or arithmetic's bare number).
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator

from rlhf_exp.data.formats.base import DataFormat, SFTExample, uses_chat_template
from rlhf_exp.data.sources import Record, read_hub, read_jsonl, vendored
from rlhf_exp.errors import ConfigError, DataError

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
PLAIN_PROMPT = "Question: {question}\nAnswer:"


def evaluate(problem: str) -> int:
    """The exact value of "3 + 4 * 2" with the usual precedence (only the operations above, integers)."""
    tokens = problem.split()
    terms = [int(tokens[0])]  # products first, then sums
    for op, value in zip(tokens[1::2], map(int, tokens[2::2])):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value if op == "+" else -value)
    return sum(terms)


def arithmetic_problems(digits: int, terms: int, operations: list[str], count: int, seed: int) -> list[str]:
    """`count` distinct problems ("7 - 3"), operands of up to `digits` digits, drawn with `seed`: every problem of
    the space shuffled when it is small, else distinct random draws."""
    operands = range(10 ** digits)
    space = len(operands) ** terms * len(operations) ** (terms - 1)
    rng = random.Random(seed)

    def render(values, ops) -> str:
        return " ".join(itertools.chain.from_iterable(zip(map(str, values), [*ops, ""]))).strip()

    if space <= 4 * count:
        every = [render(v, o) for v in itertools.product(operands, repeat=terms)
                 for o in itertools.product(operations, repeat=terms - 1)]
        rng.shuffle(every)
        return every[:count]
    seen: dict[str, None] = {}
    while len(seen) < count:
        seen.setdefault(render([rng.choice(operands) for _ in range(terms)],
                               [rng.choice(operations) for _ in range(terms - 1)]), None)
    return list(seen)


class MathFormat(DataFormat):
    """Questions with an exact answer each; the prompt a chat turn (or plain text without a template)."""

    @property
    def chat(self) -> bool:
        return uses_chat_template(self.cfg, self.tokenizer)

    def question_prompt(self, question: str) -> str:
        text = str(self.cfg.question_template).format(question=question)
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return PLAIN_PROMPT.format(question=text)

    def problems(self) -> Iterator[tuple[str, str, str, Record | None]]:
        """(question, worked answer, final answer, where it came from) of every problem."""
        raise NotImplementedError

    def sft_examples(self) -> list[SFTExample]:
        return [SFTExample(self.question_prompt(q), " " + worked if not self.chat else worked, origin,
                           {"answer": final}) for q, worked, final, origin in self.problems()]

    def prompt_examples(self) -> list[SFTExample]:
        return self.sft_examples()


class ArithmeticFormat(MathFormat):
    """Generated arithmetic: data.digits, data.terms and data.operations set the difficulty; data.num_problems
    distinct problems drawn with data.generator_seed (not the run's seed: every run sees the same problems), then
    split by prompt as any data set is (no problem is in both train and held-out)."""

    def problems(self):
        operations = list(self.cfg.operations)
        unknown = [op for op in operations if op not in OPERATIONS]
        if unknown or not operations:
            raise ConfigError("data.operations", f"must be a non-empty list of {list(OPERATIONS)}, got {operations}")
        if int(self.cfg.digits) < 1 or int(self.cfg.terms) < 2:
            raise ConfigError("data.digits" if int(self.cfg.digits) < 1 else "data.terms",
                              "needs digits >= 1 and terms >= 2")
        space = 10 ** (int(self.cfg.digits) * int(self.cfg.terms)) * len(operations) ** (int(self.cfg.terms) - 1)
        count = int(self.cfg.num_problems)
        if count > space:
            raise ConfigError("data.num_problems", f"{count} distinct problems do not exist: digits={self.cfg.digits}, "
                              f"terms={self.cfg.terms} and operations={operations} make {space}")
        for index, problem in enumerate(arithmetic_problems(int(self.cfg.digits), int(self.cfg.terms), operations,
                                                            count, int(self.cfg.generator_seed))):
            answer = str(evaluate(problem))
            yield problem, answer, answer, f"arithmetic[{index}]"


def gsm8k_final_answer(worked: str) -> str | None:
    """GSM8K's final answer: the number after "####" ("1,000" -> "1000"), None without one."""
    if "####" not in worked:
        return None
    return worked.rsplit("####", 1)[1].strip().replace(",", "")


class Gsm8kFormat(MathFormat):
    """GSM8K (Cobbe et al. 2021): vendored train (7,473) and test (1,319) problems, data.split picks one; the hub's
    openai/gsm8k (config main) with data.source=hub. The worked answer's "<<48/2=24>>" calculator notes are kept
    as they are (they are the data set's)."""

    def _records(self) -> Iterator[Record]:
        split = str(self.cfg.split)
        if self.cfg.source == "vendored":
            if split not in ("train", "test"):
                raise ConfigError("data.split", f"GSM8K has train and test, not {split!r}")
            return read_jsonl(vendored(f"gsm8k/{split}.jsonl.gz"), self.bad)
        if self.cfg.source == "hub":
            return read_hub({"path": self.cfg.hub.path, "name": self.cfg.hub.name, "split": split}, "data.hub")
        raise ConfigError("data.source", f"data=gsm8k reads vendored or hub, not {self.cfg.source!r}")

    def problems(self):
        for rec in self._records():
            try:
                question, worked = rec.get("question"), rec.get("answer")
                final = gsm8k_final_answer(worked)
                if final is None:
                    raise DataError(rec.path, "the answer has no '#### <number>' final answer", rec.line,
                                    reason="no final answer")
            except DataError as error:
                self.bad(error)
                continue
            yield question, worked, final, rec.origin
