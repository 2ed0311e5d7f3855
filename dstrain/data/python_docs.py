"""Real text every CPython carries (`pydoc_data.topics`, about 465 K characters of Python's
documentation), as a pretraining corpus, a small chat set and preference pairs: demos and tests
need no download."""

import random
import re
from pydoc_data.topics import topics


def documentation_texts() -> list[str]:
    """One text per documentation topic, in a fixed order."""
    return [topics[name] for name in sorted(topics)]


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs, each unwrapped to one line; headings, grammar and code blocks left out."""
    prose = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if block.startswith(" ") or any(set(line.strip()) <= set("*=-") for line in lines if line.strip()):
            continue
        prose.append(" ".join(line.strip() for line in lines))
    return [p for p in prose if len(p) > 40]


def _question_answer_pairs() -> list[tuple[str, str]]:
    pairs = []
    for name in sorted(topics):
        text = topics[name]
        title = text.split("\n", 1)[0].strip()
        paragraphs = _paragraphs(text)
        if title and paragraphs:
            pairs.append((f"What does the Python documentation say about {title}?", paragraphs[0]))
    # "str.upper()\n\n   Return a copy of ..." entries: one question per string method.
    for method, body in re.findall(r"\n(str\.\w+\([^)]*\))\n\n((?:   .+\n)+)", topics["string-methods"]):
        answer = " ".join(line.strip() for line in body.split("\n") if line.strip())
        pairs.append((f"What does {method} do?", answer.split(". ")[0].rstrip(".") + "."))
    return pairs


def documentation_chats(seed: int = 0) -> list[dict]:
    """Single-turn questions on each topic and string method, plus multi-turn chains of them."""
    pairs = _question_answer_pairs()
    system = {"role": "system", "content": "You answer questions about Python briefly."}
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    shuffled = random.Random(seed).sample(pairs, len(pairs))
    for start in range(0, len(shuffled) - 2, 3):
        turns = [system]
        for question, answer in shuffled[start:start + 3]:
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        chats.append({"messages": turns})
    return chats


def documentation_preferences(seed: int = 0) -> list[dict]:
    """One pair per question: its answer (chosen) against the same words in a scrambled order
    (rejected), a difference the demo's small model learns to score in an epoch or two."""
    rng = random.Random(seed)
    pairs = []
    for question, answer in _question_answer_pairs():
        words = answer.split()
        if len(set(words)) < 4:
            continue
        scrambled = words[:]
        while scrambled == words:
            rng.shuffle(scrambled)
        pairs.append({"prompt": question, "chosen": answer, "rejected": " ".join(scrambled)})
    return pairs
