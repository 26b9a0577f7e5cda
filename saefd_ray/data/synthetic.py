"""The built-in offline task family: small classification tasks a tiny model learns in a minute.

Every task reads the same kind of input — a key word from one shared lexicon of nonce words, followed by
distractor words — and answers with one of the same four group labels. What differs is the rule: each task
assigns the key words to groups by its own seeded permutation. The tasks are therefore learnable together
(the prompt names the rule, so a multi-task model can solve all of them) but interfere when learned in
sequence: training rule B moves the very features rule A relied on, so forgetting is visible in the R matrix.
"""

from __future__ import annotations

import random

from saefd_ray.config import TaskConfig
from saefd_ray.data.tasks import Example, Task
from saefd_ray.errors import DataError

LABELS = ["north", "south", "east", "west"]
_SYLLABLES = ["ka", "lo", "mi", "tu", "re", "zo", "pa", "ni", "su", "ve", "do", "bi"]
LEXICON = sorted({a + b for a in _SYLLABLES for b in _SYLLABLES if a != b})[:48]
GENERATORS = ("rule_a", "rule_b", "rule_c", "rule_d", "rule_e", "rule_f")
TRAIN_SIZE, TEST_SIZE, DISTRACTORS = 384, 96, 2


def group_of(generator: str) -> dict[str, str]:
    """The rule: a balanced, seeded assignment of every key word to a label."""
    rng = random.Random(f"saefd-synthetic:{generator}")
    words = list(LEXICON)
    rng.shuffle(words)
    return {word: LABELS[i % len(LABELS)] for i, word in enumerate(words)}


def _examples(generator: str, count: int, rng: random.Random) -> list[Example]:
    mapping = group_of(generator)
    rule = generator.replace("_", " ")
    examples = []
    for _ in range(count):
        key = rng.choice(LEXICON)
        distractors = " ".join(rng.choice(LEXICON) for _ in range(DISTRACTORS))
        prompt = f"Under {rule}, which direction does the first word point to? Words: {key} {distractors}"
        examples.append(Example(prompt, mapping[key]))
    return examples


def load_synthetic(spec: TaskConfig) -> Task:
    if spec.generator not in GENERATORS:
        raise DataError(f"task {spec.name!r}: unknown generator {spec.generator!r} (known: {', '.join(GENERATORS)})")
    rng = random.Random(f"saefd-synthetic-data:{spec.generator}")
    train = _examples(spec.generator, TRAIN_SIZE, rng)
    test = _examples(spec.generator, TEST_SIZE, rng)
    return Task(spec.name, spec.metric or "options", train, test, options=list(LABELS))


def corpus_text() -> list[str]:
    """Text the offline tokenizer is trained on: every prompt and label the generators can produce."""
    lines = [f"Under {g.replace('_', ' ')}, which direction does the first word point to? Words:" for g in GENERATORS]
    return lines + [" ".join(LEXICON), " ".join(LABELS)]
