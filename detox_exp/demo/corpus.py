"""Deterministic offline demo data: DialogSum-like dialogues and a labeled toxicity corpus.

Stand-ins for ``knkarthick/dialogsum`` and a hate-speech corpus, so the whole pipeline (SFT of a
tiny T5, reward-classifier training, PPO) runs without network access.

* :func:`generate_dialogues` - "#Person1#: ...\\n#Person2#: ..." dialogues on everyday topics with
  short template summaries that copy content words from the dialogue. With probability
  ``rude_rate`` a summary gets a mild insult inserted. The rude decision comes from its own RNG
  stream, independent of the dialogue, and the rude variant contains every word of the polite one
  (ROUGE-L recall 1), so a policy can drop the insult at a small ROUGE cost.
* :func:`generate_classifier_corpus` - texts labeled 1 = "hate" (insults someone), 0 = "nothate":
  polite/rude summaries from the same templates, standalone insults (some with no keyword from
  :data:`INSULTS`), and hard negatives (complaints, anger at things, disagreement,
  self-deprecation, literal uses such as "the clown at the party", negated insults).
* :func:`split_records` - deduplicated, deterministic, disjoint train/test split.

Everything is driven by ``random.Random`` instances seeded from ``seed``; the global RNG is unused.
"""

from __future__ import annotations

import hashlib
import random
import re

from detox_exp.demo.topics import COMMON_SLOTS, GENERIC_MIDS, TOPIC_TABLE, Topic

LABELS = ("nothate", "hate")  # index = label id
INSULTS = (
    "idiot", "stupid", "moron", "fool", "dumb", "jerk",
    "loser", "clown", "pathetic", "useless", "idiotic", "brainless",
)  # fmt: skip
_INSULT_RE = re.compile(r"\b(" + "|".join(INSULTS) + r")\b", re.IGNORECASE)
_PERSON_RE = re.compile(r"#Person[12]#")

# Rude insertions: before the subject, as an apposition, before the object, or as a tail.
_RUDE_NP = ("that idiot", "that stupid", "the useless", "that moron", "the pathetic", "that dumb",
            "that clown", "that jerk", "that loser", "that fool", "the brainless")  # fmt: skip
_RUDE_APPOS = ("a total moron", "the idiot", "that pathetic loser", "a useless clown",
               "the stupid fool", "a real jerk", "a complete idiot", "the dumb clown")  # fmt: skip
_RUDE_TAIL = ("the stupid fool", "like a total idiot", "what a moron", "the useless clown",
              "like a pathetic loser", "being a dumb jerk", "the brainless idiot",
              "what an idiot")  # fmt: skip


def _norm(text: object) -> str:
    return " ".join(str(text).lower().split())


def contains_insult(text: str) -> bool:
    """True if ``text`` contains a word from :data:`INSULTS` (a keyword test, not a classifier)."""
    return _INSULT_RE.search(text) is not None


def _sub_rng(seed: int, stream: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _fill_slots(topic: Topic, rng: random.Random) -> dict[str, str]:
    return {k: rng.choice(v) for k, v in topic.slots.items()}


def _make_rude(summary: str, rng: random.Random) -> str:
    """Insert one mild insult; every word of ``summary`` is kept, in order."""
    mentions = [m.start() for m in _PERSON_RE.finditer(summary)]
    mode = rng.choice(("subj", "appos", "tail") + (("obj",) if len(mentions) > 1 else ()))
    if mode == "subj":
        phrase = rng.choice(_RUDE_NP)
        return f"{phrase[0].upper()}{phrase[1:]} {summary}"
    if mode == "appos":
        end = len("#Person1#")
        return f"{summary[:end]}, {rng.choice(_RUDE_APPOS)},{summary[end:]}"
    if mode == "obj":
        pos = mentions[1]
        return f"{summary[:pos]}{rng.choice(_RUDE_NP)} {summary[pos:]}"
    return f"{summary.rstrip('.')}, {rng.choice(_RUDE_TAIL)}."


def _summary(rng: random.Random) -> str:
    topic = rng.choice(TOPIC_TABLE)
    return rng.choice(topic.summaries).format(**_fill_slots(topic, rng))


def _dialogue(topic: Topic, slots: dict[str, str], rng: random.Random) -> str:
    pairs = [rng.choice(topic.opens)]
    pairs += rng.sample(topic.mids + GENERIC_MIDS, rng.randint(0, 2))
    pairs.append(rng.choice(topic.closes))
    lines = [line for pair in pairs for line in pair.format(**slots).split("||")]
    if len(lines) > 4 and rng.random() < 0.4:
        lines.pop()  # odd number of turns: Person1 has the last word
    return "\n".join(f"#Person{1 + i % 2}#: {line}" for i, line in enumerate(lines))


def generate_dialogues(n: int, seed: int, rude_rate: float = 0.35) -> list[dict[str, str]]:
    """``n`` distinct DialogSum-style records ``{"id", "dialogue", "summary", "topic"}``.

    Dialogues (4-8 turns, 200-1000 characters) and polite summaries depend only on ``seed``; the
    rude decision (probability ``rude_rate``) and the insult come from a separate stream, so the
    same seed with a different ``rude_rate`` gives the same dialogues and underlying summaries.
    """
    if n < 0 or not 0.0 <= rude_rate <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= rude_rate <= 1, got n={n}, rude_rate={rude_rate}")
    rng, style = random.Random(seed), _sub_rng(seed, "style")
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct dialogues")
        topic = rng.choice(TOPIC_TABLE)
        slots = _fill_slots(topic, rng)
        dialogue = _dialogue(topic, slots, rng)
        summary = rng.choice(topic.summaries).format(**slots)
        if not 200 <= len(dialogue) <= 1000 or dialogue in seen:
            continue
        seen.add(dialogue)
        if style.random() < rude_rate:
            summary = _make_rude(summary, style)
        assert 200 <= len(dialogue) <= 1000 and 8 <= len(summary.split()) <= 20
        i = len(records)
        records.append({"id": f"demo_{i:05d}", "dialogue": dialogue, "summary": summary,
                        "topic": topic.name})  # fmt: skip
    return records


# Classifier tables, "key: alt ~ alt" ("_" = empty). T_* are templates; other keys fill {key}.
# {S} {be} {O} {pron} {have} come from _TARGETS, {n}/{adj} from the insult nouns/adjectives.
_CLF_DATA = """
T_insult: {S} {be} {i_n} ~ {S} {be} such {i_n} ~ what {a_adj} {n} ~ shut up, you {adj} {n} ~ shut up, you {n} ~ only {a_n} would {act} ~ {S} {be} {adj} as a rock ~ stop talking, you {n} ~ nobody cares what you think, you {adj} {n} ~ {S} {be} the biggest {n} I have ever met ~ go away, you {adj} {n} ~ {S} {be} too {adj} to {task} ~ what kind of {n} does that? ~ are you really this {adj}? ~ {S} {be} {a_adj} {n} ~ {S} {be} so {adj}, it is embarrassing ~ do not listen to {O}, {pron} {be} {i_n} ~ everyone knows {S} {be} {a_n}
T_insult_nokw: {S} {be} a complete waste of space ~ get lost, nobody wants you here ~ {S} {be} worthless and everyone knows it ~ {S} {have} the brain of a goldfish ~ shut your mouth, nobody asked you ~ {S} {be} a total disgrace ~ nobody can stand {O} ~ {S} {be} as sharp as a bowling ball ~ crawl back under your rock ~ {S} {be} too thick to understand anything ~ {S} {be} a waste of oxygen ~ go away, nobody likes you ~ {S} {be} a joke and a failure
T_hard: {feel} {emotion} that {event}. ~ I {adv} disagree with {thing}{tail}. ~ I hate {hated}{so}. ~ {sorry}, that was a {selfadj} mistake of mine{fix}. ~ I feel so {selfadj} for forgetting {forgot}. ~ I was a fool to {regret}. ~ The clown at {name}'s birthday party made the kids laugh. ~ The loser of the {game} has to buy {treat} on {day}. ~ This old {device} is useless now that {reason}. ~ {name} still uses a dumb phone without internet. ~ {S} {be} not {a_n} at all, {pron} {be} {positive}. ~ I would never call {O} {a_n}, {pron} {be} {positive}. ~ The {thing2} was {bad}{tail2}. ~ Your report has several errors, please fix them by {day}. ~ #Person1# complains to #Person2# that the {part} is broken again. ~ #Person1# is angry because #Person2# was late again. ~ #Person2# disagrees with #Person1# about {project}. ~ #Person1# is furious about the delayed {lost}.
T_neutral: {name} is going to {place} on {day}. ~ Can you send me the {doc} by {time}? ~ The meeting with {name} starts at {time} on {day}. ~ {name} bought a new {item} on {day}. ~ Thank you for your help with the {doc}, {name}. ~ Please remind {name} to bring the {doc} on {day}. ~ {name} and I had lunch near {place} on {day}. ~ The weather should be sunny on {day}.
act: do that ~ park like this ~ say something like that ~ forget the tickets ~ believe that story ~ answer like that ~ lose the keys twice
task: understand anything ~ do this job ~ read a map ~ follow simple rules ~ cook an egg
feel: I am ~ We are ~ {name} is ~ My mother is ~ Everyone here is
emotion: furious ~ so angry ~ really upset ~ annoyed ~ frustrated ~ disappointed ~ fed up ~ livid
event: my order is late again ~ the train was cancelled twice this week ~ the heating broke again ~ the package arrived damaged ~ nobody answered my emails ~ the meeting ran two hours over ~ the price went up again ~ my flight was delayed for six hours ~ the repair took three weeks ~ the store closed early on {day} ~ my internet stopped working again ~ the bus did not show up this morning ~ they lost my reservation ~ the refund has still not arrived
adv: completely ~ strongly ~ honestly ~ totally
thing: your plan ~ the new schedule ~ this decision ~ the budget cuts ~ the new rules ~ your proposal
tail: _ ~ , and I will say so at the meeting ~ , but I respect your view ~ . It will not work
hated: Mondays ~ waiting in line ~ cold coffee ~ this rainy weather ~ traffic jams ~ slow internet
so: _ ~  so much ~  more than anything
sorry: Sorry ~ I am sorry ~ Oops ~ My apologies
selfadj: stupid ~ dumb
fix: _ ~ , I will fix it today ~  on the form
forgot: my keys ~ the meeting ~ your birthday ~ the password ~ to call you back ~ my umbrella
regret: believe that ad ~ buy such a cheap phone ~ leave so late ~ ignore the weather forecast
game: chess game ~ tennis match ~ card game ~ quiz ~ bet
treat: coffee ~ lunch ~ pizza ~ ice cream
device: charger ~ printer ~ map ~ adapter ~ remote ~ ticket
positive: brilliant ~ very kind ~ really smart ~ a great colleague ~ just tired ~ the best in the team
reason: I have a new phone ~ the office moved ~ everything is online ~ the trip was cancelled
thing2: food ~ service ~ hotel ~ movie ~ book ~ concert
bad: disappointing ~ terrible ~ far too expensive ~ really boring
tail2: _ ~ , I want a refund ~  and I will not come back
part: printer ~ heater ~ elevator ~ washing machine ~ dishwasher
lost: package ~ train ~ flight
project: the budget report ~ the marketing plan ~ the new website
place: the library ~ the supermarket ~ the office ~ the airport ~ the gym ~ the post office
doc: report ~ invoice ~ schedule ~ slides ~ contract ~ photos ~ meeting notes
item: jacket ~ bike ~ phone ~ lamp ~ sofa ~ laptop ~ coffee machine
"""  # noqa: E501
_CLF = {
    key: tuple("" if alt == "_" else alt for alt in rest.split(" ~ "))
    for key, _, rest in (line.partition(": ") for line in _CLF_DATA.strip("\n").splitlines())
}
_CLF_SLOTS = {k: v for k, v in {**COMMON_SLOTS, **_CLF}.items() if not k.startswith("T_")}
_NOUNS = ("idiot", "moron", "fool", "jerk", "loser", "clown")
_ADJS = ("stupid", "dumb", "pathetic", "useless", "idiotic", "brainless")
_INTENS = ("", "complete ", "total ", "absolute ", "utter ", "real ", "big ")
_PREFIX = ("", "", "", "Honestly, ", "Wow, ", "Ugh, ", "Seriously, ", "Listen, ")
_TARGETS = (  # (subject, be, object, pronoun, have)
    ("you", "are", "you", "you", "have"), ("he", "is", "him", "he", "has"),
    ("she", "is", "her", "she", "has"),
) + tuple((s, "is", s, p, "has") for s, p in (
    ("your brother", "he"), ("that guy", "he"), ("the new manager", "she"), ("my neighbor", "he"),
    ("the waiter", "he"), ("your boss", "she"), ("my cousin", "she"), ("that driver", "he"),
    ("your friend", "he"),
))  # fmt: skip


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fill(template: str, rng: random.Random) -> str:
    subj, be, obj, pron, have = rng.choice(_TARGETS)
    if rng.random() < 0.25:
        subj = obj = rng.choice(COMMON_SLOTS["name"])
        be, have, pron = "is", "has", rng.choice(("he", "she"))
    noun, adj = rng.choice(_NOUNS), rng.choice(_ADJS)
    values = {k: rng.choice(v) for k, v in _CLF_SLOTS.items()}
    values.update(S=subj, be=be, O=obj, pron=pron, have=have, n=noun, adj=adj,
                  i_n=_article(rng.choice(_INTENS) + noun), a_n=_article(noun),
                  a_adj=_article(adj))  # fmt: skip
    return template.format(**values).format(**values)  # second pass: nested {day}/{name}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _insult(rng: random.Random) -> str:
    body = _fill(rng.choice(_CLF["T_insult_nokw" if rng.random() < 0.33 else "T_insult"]), rng)
    prefix = rng.choice(_PREFIX)
    if body.startswith(("you", "shut", "go", "get", "stop")) and rng.random() < 0.2:
        prefix = rng.choice(COMMON_SLOTS["name"]) + ", "
    text = prefix + body
    if not text.endswith("?"):
        text += rng.choice((".", "!", "", "!!"))
    return _cap(text) if rng.random() < 0.8 else text


def generate_classifier_corpus(n: int, seed: int) -> list[dict]:
    """Up to ``n`` unique ``{"text", "label"}`` records (1 = "hate", 0 = "nothate"), balanced.

    Label = whether the text insults someone. Draws alternate so the labels stay balanced. Hate:
    rude summaries from the :func:`generate_dialogues` templates (~1/2) and standalone insults
    (~1/2, a third of them without any :data:`INSULTS` word). Nothate: polite summaries (~1/2),
    hard negatives (~1/3: complaints, anger at things, disagreement, self-deprecation, literal
    uses such as "the clown at the party", negated insults) and neutral sentences. Texts are
    deduplicated (case/space normalised) and the number of draws is bounded, so fewer than ``n``
    records can come back for very large ``n`` (for ``n <= 6000`` all ``n`` do).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    counts = [0, 0]
    for _ in range(20 * n + 100):
        if len(out) >= n:
            break
        label = int(counts[1] < counts[0])
        r = rng.random()
        if r < 0.5:
            text = _summary(rng)
            text = _make_rude(text, rng) if label else text
        elif label:
            text = _insult(rng)
        else:
            kind = "T_hard" if r < 0.83 else "T_neutral"
            text = _cap(_fill(rng.choice(_CLF[kind]), rng))
        key = _norm(text)
        if key not in seen:
            seen.add(key)
            counts[label] += 1
            out.append({"text": text, "label": label})
    return out


def split_records(
    records: list[dict], key: str, test_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Deduplicate by normalised ``record[key]`` (first kept), shuffle with ``seed``, split.

    Returns ``(train, test)`` with ``round(len * test_fraction)`` test records; the two sides are
    disjoint in ``key``. Raises ValueError if ``test_fraction`` is not in (0, 1) or a side would
    be empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    seen: set[str] = set()
    unique = []
    for record in records:
        k = _norm(record[key])
        if k not in seen:
            seen.add(k)
            unique.append(record)
    random.Random(seed).shuffle(unique)
    n_test = round(len(unique) * test_fraction)
    if n_test == 0 or n_test == len(unique):
        raise ValueError(
            f"split of {len(unique)} unique records with test_fraction={test_fraction} "
            "leaves a side empty"
        )
    return unique[n_test:], unique[:n_test]
