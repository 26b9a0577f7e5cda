"""The built-in offline task family: small classification tasks a tiny model learns in a minute.

Every task reads the same kind of input — five nonce words from one shared lexicon — and answers with one of
the same four direction labels: the direction that most of the words point to. What differs is the rule:
each task assigns the words to directions by its own seeded permutation. (A majority over a bag of words is
what even a random-init transformer's near-uniform attention can read, so LoRA learns it in a minute.) The tasks are therefore learnable together
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
LEXICON = sorted({a + b for a in _SYLLABLES for b in _SYLLABLES if a != b})[::4][:32]
GENERATORS = ("rule_a", "rule_b", "rule_c", "rule_d", "rule_e", "rule_f")
TRAIN_SIZE, TEST_SIZE, WORDS, MAJORITY = 384, 96, 5, 3


def group_of(generator: str) -> dict[str, str]:
    """The rule: a balanced, seeded assignment of every key word to a label."""
    rng = random.Random(f"saefd-synthetic:{generator}")
    words = list(LEXICON)
    rng.shuffle(words)
    return {word: LABELS[i % len(LABELS)] for i, word in enumerate(words)}


def _examples(generator: str, count: int, rng: random.Random) -> list[Example]:
    mapping = group_of(generator)
    by_label = {label: [w for w in LEXICON if mapping[w] == label] for label in LABELS}
    rule = generator.replace("_", " ")
    examples = []
    for _ in range(count):
        label = rng.choice(LABELS)
        others = [w for w in LEXICON if mapping[w] != label]
        words = rng.sample(by_label[label], MAJORITY) + rng.sample(others, WORDS - MAJORITY)
        rng.shuffle(words)
        examples.append(Example(f"{rule}: {' '.join(words)}", label))
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
    roles = "system user assistant"  # chat-template role names, so they are single tokens
    return [f"{g.replace('_', ' ')}:" for g in GENERATORS] + [" ".join(LEXICON), " ".join(LABELS), roles]
